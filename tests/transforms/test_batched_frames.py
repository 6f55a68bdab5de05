"""Batched 2D frame views: the maths, the records and the distributions of the per-sample path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from byol3d.config import load_config
from byol3d.models.correspondence import source_to_view
from byol3d.training.accel import DeviceViewLoader
from byol3d.training.engine import view_geometry
from byol3d.transforms import build_transforms
from byol3d.transforms.batched import FrameBoxViewsd, collate_boxes
from byol3d.transforms.batched_ops import MakeViewsCollate, make_views
from byol3d.transforms.crops import RandResizedCropd
from byol3d.transforms.frames import _normalise, frame_views
from byol3d.transforms.photometric import (
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandSolarized,
)

ROI = (12, 10)
MEAN, STD = [0.45, 0.2, 0.3], [0.3, 0.15, 0.2]
FRAME_2D = ["data.spatial_dims=2", "data.in_channels=3", "transforms.roi_size=[32,32]"]


def frames_batch(n, image, seed=0, **kwargs):
    draw = FrameBoxViewsd(roi_size=kwargs.pop("roi_size", ROI), **kwargs).set_random_state(seed=seed)  # fmt: skip
    return collate_boxes([draw({"image": image}) for _ in range(n)])


def reference(image, batch, key, i, roi):
    """One view by the per-sample path's own transforms, with the batch's draws forced."""
    c = image.shape[0]
    x = image.float() / 255.0 if not image.is_floating_point() else image.float()
    x = RandResizedCropd("x", roi_size=roi)._crop_resize(x, batch[f"{key}_box"][i].numpy())
    if batch[f"{key}_flip"][i, 0]:
        x = torch.flip(x, (1,))
    factors = batch[f"{key}_jitter"][i]
    if torch.any(factors != torch.tensor([1.0, 1.0, 1.0, 0.0])):
        jitter = RandColorJitterd("x", prob=1.0)
        jitter.order = batch[f"{key}_jitter_order"][i].tolist()
        jitter.factors = [float(f) for f in factors]
        x = jitter.apply(x)
    if batch[f"{key}_grayscale"][i]:
        x = RandGrayscaled("x", prob=1.0).apply(x)
    sigma = float(batch[f"{key}_sigma"][i, 0])
    if sigma > 0:
        blur = RandGaussianBlurd("x", prob=1.0)
        blur.sigma = sigma
        x = blur.apply(x)
    if batch[f"{key}_solarize"][i]:
        x = RandSolarized("x", prob=1.0).apply(x)
    return torch.as_tensor(_normalise("x", MEAN[:c], STD[:c])({"x": x})["x"])


@pytest.mark.parametrize("grid_sample", [True, False])
@pytest.mark.parametrize("channels", [3, 1])
def test_views_equal_the_cpu_paths_ops_with_the_same_draws(grid_sample, channels):
    # every op fires often (and blur sigmas up to 4 px on a 10-px view: the kernels are
    # shortened at the border as the per-sample blur shortens them)
    image = torch.randint(0, 256, (channels, 30, 26), dtype=torch.uint8)
    probs = dict(flip_prob=0.5, colour_jitter_prob=0.8, grayscale_prob=0.4, blur_prob=0.7,
                 solarize_prob=0.5, blur_sigma=(0.3, 4.0))  # fmt: skip
    batch = frames_batch(16, image, seed=3, mean=MEAN[:channels], std=STD[:channels], **probs)
    made = make_views(batch, ROI, "cpu", grid_sample=grid_sample)
    for key in ("view1", "view2"):
        fired = {n: batch[f"{key}_{n}"].bool().any().item() for n in ("grayscale", "solarize")}
        assert all(fired.values()) and (batch[f"{key}_sigma"] > 2.5).any()
        assert batch[f"{key}_flip"][:, 0].any() and not batch[f"{key}_flip"][:, 1].any()
        for i in range(16):
            want = reference(image, batch, key, i, ROI)
            torch.testing.assert_close(made[key][i], want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("grid_sample", [True, False])
def test_records_locate_every_source_point_in_the_made_view(grid_sample):
    # a linear ramp survives bilinear resampling exactly, so the made view read at
    # source_to_view(p) must give the ramp's value at p (what the dense term relies on)
    rows, cols = torch.meshgrid(torch.arange(40.0) + 0.5, torch.arange(36.0) + 0.5, indexing="ij")
    ramp = (0.01 * rows + 0.02 * cols)[None].expand(3, -1, -1).contiguous()
    plain = dict(colour_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    batch = frames_batch(8, ramp, seed=4, roi_size=(16, 16), mean=0.0, std=1.0, **plain)
    made = make_views(batch, (16, 16), grid_sample=grid_sample)
    assert made["view1_flip"][:, 0].any() and not made["view1_flip"][:, 0].all()
    geo = view_geometry(made, "view1")
    lo, hi = geo["box"][..., 0].float(), geo["box"][..., 1].float()
    points = lo[:, None] + (torch.rand(8, 20, 2) * 0.6 + 0.2) * (hi - lo)[:, None]
    u = source_to_view(points, geo["box"], geo["flip"], geo["rot90"])
    read = torch.nn.functional.grid_sample(made["view1"], (2 * u - 1).flip(-1)[:, :, None], align_corners=False)  # fmt: skip
    want = 0.01 * points[..., 0] + 0.02 * points[..., 1]
    torch.testing.assert_close(read[:, 0, :, 0], want, atol=1e-4, rtol=0)


def test_output_shape_dtype_keys_and_normalisation_match_the_cpu_path():
    frame = torch.full((3, 40, 36), 200, dtype=torch.uint8)
    frame[1], frame[2] = 90, 30
    plain = dict(colour_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    draw = FrameBoxViewsd(roi_size=(16, 16), mean=MEAN, std=STD, **plain).set_random_state(seed=0)  # fmt: skip
    made = MakeViewsCollate((16, 16))([draw({"image": frame}) for _ in range(3)])
    cpu = frame_views(roi_size=(16, 16), mean=MEAN, std=STD, **plain)({"image": frame})
    for key in ("view1", "view2"):
        assert made[key].shape == (3, *cpu[key].shape) and made[key].dtype == cpu[key].dtype
        want = (torch.tensor([200, 90, 30]) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
        torch.testing.assert_close(made[key], want.view(1, 3, 1, 1).expand_as(made[key]), atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(cpu[key], want.view(3, 1, 1).expand_as(cpu[key]), atol=1e-5, rtol=0)  # fmt: skip
    # the CPU path's records, plus rot90 = 0 (frames are never turned)
    assert {k for k in cpu if k != "view1" and k != "view2"} == {f"view{v}_{r}" for v in (1, 2) for r in ("box", "flip")}  # fmt: skip
    assert set(made) == {"view1", "view2"} | {f"view{v}_{r}" for v in (1, 2) for r in ("box", "flip", "rot90")}  # fmt: skip
    assert not made["view2_rot90"].any()


def test_views_do_not_depend_on_the_batch_and_the_device_loader_makes_the_same():
    image = torch.randint(0, 256, (3, 30, 28), dtype=torch.uint8)
    draw = FrameBoxViewsd(roi_size=ROI, grayscale_prob=0.5, solarize_prob=0.5).set_random_state(seed=1)  # fmt: skip
    samples = [draw({"image": image}) for _ in range(5)]
    together = make_views(collate_boxes(samples), ROI)
    loader = torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=collate_boxes)
    batches = list(DeviceViewLoader(loader, ROI, "cpu", memory_format=torch.channels_last))
    assert [b["view1"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["view1"].is_contiguous(memory_format=torch.channels_last)
    for i, sample in enumerate(samples):
        alone = make_views(collate_boxes([sample]), ROI)
        for key in ("view1", "view2"):
            torch.testing.assert_close(alone[key][0], together[key][i], atol=1e-6, rtol=0)
            torch.testing.assert_close(batches[i // 2][key][i % 2], together[key][i], atol=1e-6, rtol=0)  # fmt: skip


N = 4000  # draws per view; a frequency's standard error is at most 0.5 / sqrt(N) = 0.008


def test_draws_follow_the_config_probabilities_and_ranges():
    draw = FrameBoxViewsd(roi_size=(32, 32)).set_random_state(seed=5)  # BYOL's recipe: the defaults
    shape = (60, 60)  # square: the log aspect ratio is symmetric about 0
    for v, blur_p, solarize_p in ((0, 1.0, 0.0), (1, 0.1, 0.2)):
        views = [draw.randomize(shape, v) for _ in range(N)]
        d = {k: np.stack([p[k] for p in views]) for k in views[0]}
        sides = (d["box"][..., 1] - d["box"][..., 0]).astype(float)
        frac = sides.prod(axis=1) / np.prod(shape)
        # the area fraction is uniform in [0.08, 1] (the whole frame has ratio 1): mean 0.54,
        # sd of the mean 0.27 / sqrt(N) = 0.004
        assert frac.min() >= 0.08 * 0.97 and frac.max() <= 1.0
        assert frac.mean() == pytest.approx(0.54, abs=0.02)
        log_ratio = np.log(sides[:, 1] / sides[:, 0])  # log-uniform in [log 3/4, log 4/3]
        assert log_ratio.min() >= math.log(0.75) - 0.01 and log_ratio.max() <= math.log(4 / 3) + 0.01  # fmt: skip
        assert abs(log_ratio.mean()) < 0.02  # sd of the mean 0.17 / sqrt(N) = 0.003
        assert d["flip"][:, 0].mean() == pytest.approx(0.5, abs=0.03) and not d["flip"][:, 1].any()
        assert not d["rot90"].any()
        jit = np.any(d["jitter"] != np.float32([1, 1, 1, 0]), axis=1)
        assert jit.mean() == pytest.approx(0.8, abs=0.03)
        f = d["jitter"][jit]
        # each factor uniform in its range: about 3200 draws, the mean's sd (hi - lo) / 196
        for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            assert f[:, col].min() >= lo and f[:, col].max() <= hi
            assert f[:, col].mean() == pytest.approx((lo + hi) / 2, abs=0.025 * (hi - lo))
        orders = d["jitter_order"][jit]
        assert np.all(np.sort(orders, axis=1) == np.arange(4))
        # each adjustment comes first a quarter of the time (sd 0.008)
        np.testing.assert_allclose(np.bincount(orders[:, 0], minlength=4) / len(orders), 0.25, atol=0.035)  # fmt: skip
        assert d["grayscale"].mean() == pytest.approx(0.2, abs=0.03)
        blur = d["sigma"][:, 0] > 0
        assert blur.mean() == pytest.approx(blur_p, abs=0.03)
        assert np.all(d["sigma"][:, 0] == d["sigma"][:, 1])  # isotropic
        assert d["sigma"][blur, 0].min() >= 0.1 and d["sigma"][blur, 0].max() <= 2.0
        assert d["sigma"][blur, 0].mean() == pytest.approx(1.05, abs=0.04)
        assert d["solarize"].mean() == pytest.approx(solarize_p, abs=0.03)
        np.testing.assert_allclose(d["mean"], 0.5)
        np.testing.assert_allclose(d["std"], 0.5)


def test_draws_match_the_cpu_paths_distribution():
    # 600 samples of each path (per view): the difference of two frequencies has a standard
    # error of at most 0.5 * sqrt(2 / 600) = 0.029, of two mean area fractions 0.27 *
    # sqrt(2 / 600) = 0.016, of two mean sigmas (uniform in [0.1, 0.6]) 0.008, of two mean
    # brightness factors (uniform in [0.6, 1.4]) 0.015: tolerances of about 4 of them (the
    # exact ranges and rates are the test above's)
    shape, n = (30, 26), 600
    cpu = frame_views(roi_size=(8, 8), blur_sigma=(0.1, 0.6))
    cpu.set_random_state(seed=2)
    draw = FrameBoxViewsd(roi_size=(8, 8), blur_sigma=(0.1, 0.6)).set_random_state(seed=2)
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    ops = [cpu.transforms[1 + v].transforms for v in (0, 1)]
    a = {v: [] for v in (0, 1)}
    for _ in range(n):
        s = cpu({"image": image})
        for v, key in enumerate(("view1", "view2")):
            jitter, grey, blur, solar = ops[v][3], ops[v][4], ops[v][5], ops[v][6]
            box = s[f"{key}_box"]
            a[v].append({"frac": np.prod(box[:, 1] - box[:, 0]) / np.prod(shape), "flip": s[f"{key}_flip"][0],
                         "jitter": jitter._do_transform, "grayscale": grey._do_transform,
                         "blur": blur._do_transform, "sigma": blur.sigma if blur._do_transform else np.nan,
                         "solarize": solar._do_transform, "brightness": jitter.factors[0] if jitter._do_transform else np.nan})  # fmt: skip
    for v in (0, 1):
        b = []
        for _ in range(n):
            p = draw.randomize(shape, v)
            fired = bool(np.any(p["jitter"] != np.float32([1, 1, 1, 0])))
            b.append({"frac": np.prod(p["box"][:, 1] - p["box"][:, 0]) / np.prod(shape), "flip": p["flip"][0],
                      "jitter": fired, "grayscale": p["grayscale"], "blur": p["sigma"][0] > 0,
                      "sigma": p["sigma"][0] if p["sigma"][0] > 0 else np.nan, "solarize": p["solarize"],
                      "brightness": p["jitter"][0] if fired else np.nan})  # fmt: skip
        for name, tol in [("frac", 0.065), ("flip", 0.12), ("jitter", 0.12), ("grayscale", 0.12),
                          ("blur", 0.12), ("solarize", 0.12), ("sigma", 0.035), ("brightness", 0.06)]:  # fmt: skip
            ours = np.nanmean([float(s[name]) for s in b])
            theirs = np.nanmean([float(s[name]) for s in a[v]])
            assert ours == pytest.approx(theirs, abs=tol), (v, name, ours, theirs)


def test_config_switch_builds_the_batched_frame_views_with_the_configs_keys():
    cfg = load_config(None, [*FRAME_2D, "transforms.views=batched", "transforms.grayscale_prob=[0.1,0.3]",
                             "transforms.mean=[0.4,0.3,0.2]", "transforms.std=[0.2,0.2,0.1]"])  # fmt: skip
    preprocess, views = build_transforms(cfg)
    assert isinstance(views, FrameBoxViewsd) and views.roi_size == (32, 32)
    assert views.ops[1]["grayscale"].prob == pytest.approx(0.3)
    assert views.ops[0]["blur"].prob == 1.0 and views.ops[1]["solarize"].prob == pytest.approx(0.2)  # fmt: skip
    np.testing.assert_allclose(views.mean, [0.4, 0.3, 0.2])
    np.testing.assert_allclose(views.std, [0.2, 0.2, 0.1])
    sample = views({"image": torch.zeros(3, 40, 40, dtype=torch.uint8)})
    assert sample["view1_patch"].dtype == torch.uint8
    with pytest.raises(ValueError, match="roi_size must be 2 sizes"):
        FrameBoxViewsd(roi_size=(8, 8, 8))
    with pytest.raises(ValueError, match="std must be positive"):
        FrameBoxViewsd(roi_size=(8, 8), std=[0.5, 0.0, 0.5])
