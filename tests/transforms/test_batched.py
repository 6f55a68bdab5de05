"""Batched views: the same geometry, records and distributions as the per-sample CPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AdjustContrast, GaussianSmooth, ScaleIntensity, ShiftIntensity

from byol3d.config import load_config
from byol3d.errors import ConfigError
from byol3d.models.correspondence import source_to_view
from byol3d.training.accel import DeviceViewLoader
from byol3d.training.engine import view_geometry
from byol3d.transforms import build_transforms
from byol3d.transforms.batched import BoxViewsd, collate_boxes, slice_box
from byol3d.transforms.batched_ops import (
    MakeViewsCollate,
    _blur,
    _blur_batched,
    _intensity,
    _noise,
    _resample,
    _resize_flip_turn,
    make_views,
)
from byol3d.transforms.crops import RandResizedCropd
from byol3d.transforms.volume_views import view_transforms

ROI = (16, 16, 12)
PLAIN = dict(gamma_prob=0.0, intensity_prob=0.0, blur_prob=0.0, noise_prob=0.0)


def boxes(n, image, seed=0, **kwargs):
    draw = BoxViewsd(roi_size=kwargs.pop("roi_size", ROI), **kwargs).set_random_state(seed=seed)
    return collate_boxes([draw({"image": image}) for _ in range(n)])


@pytest.mark.parametrize("grid_sample", [True, False])
def test_view_equals_the_cpu_paths_crop_resize_flip_and_turn_of_the_same_box(grid_sample):
    image = torch.rand(2, 30, 26, 20)
    batch = boxes(12, image, rotate90_prob=0.7, scale=(0.05, 1.0))
    batch["view1_box"][0] = torch.tensor([[3, 19], [5, 21], [2, 14]])  # exactly roi: no resize
    batch["view1_patch"][0] = image[:, 3:19, 5:21, 2:14].clone()
    made = _resample(batch, "view1", ROI, torch.device("cpu"), grid_sample)
    crop = RandResizedCropd("image", roi_size=ROI)
    assert {int(k) for k in batch["view1_rot90"]} == {0, 1, 2, 3} and batch["view1_flip"].any()
    for i in range(12):
        ref = crop._crop_resize(image, batch["view1_box"][i].numpy())
        axes = [a + 1 for a in range(3) if batch["view1_flip"][i, a]]
        ref = torch.rot90(torch.flip(ref, axes), int(batch["view1_rot90"][i]), (1, 2))
        torch.testing.assert_close(made[i], ref, atol=2e-5, rtol=0)


def test_records_locate_every_source_point_in_the_made_view():
    # a linear ramp survives trilinear resampling exactly, so the made view read at
    # source_to_view(p) must give the ramp's value at p (points inside each box)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) + 0.5 for n in (40, 36, 30)], indexing="ij")  # fmt: skip
    ramp = (0.01 * axes[0] + 0.02 * axes[1] - 0.015 * axes[2])[None]
    batch = boxes(8, ramp, seed=3, rotate90_prob=0.5, roi_size=(16, 16, 16), **PLAIN)
    made = make_views(batch, (16, 16, 16))
    geo = view_geometry(made, "view2")
    lo, hi = geo["box"][..., 0].float(), geo["box"][..., 1].float()
    frac = torch.rand(8, 20, 3) * 0.6 + 0.2  # the central part of each box
    points = lo[:, None] + frac * (hi - lo)[:, None]
    u = source_to_view(points, geo["box"], geo["flip"], geo["rot90"])
    grid = (2 * u - 1).flip(-1)[:, :, None, None]
    read = torch.nn.functional.grid_sample(made["view2"], grid, align_corners=False)
    want = 0.01 * points[..., 0] + 0.02 * points[..., 1] - 0.015 * points[..., 2]
    torch.testing.assert_close(read.reshape(8, 20), want, atol=1e-4, rtol=0)


def test_intensity_and_blur_equal_monai_with_the_same_parameters():
    x = torch.rand(3, 1, 20, 18, 16)
    gamma, scale, shift = torch.tensor([0.8, 0.0, 1.3]), torch.tensor([1.05, 1.0, 0.93]), torch.tensor([0.02, 0.0, -0.05])  # fmt: skip
    sigma = torch.tensor([[0.7, 1.2, 0.5], [0.0, 0.0, 0.0], [1.5, 0.9, 1.1]])
    out = _blur(_intensity(x.clone(), gamma, scale, shift), sigma)
    for i in range(3):
        ref = AdjustContrast(float(gamma[i]))(x[i]) if gamma[i] > 0 else x[i]
        ref = ScaleIntensity(minv=None, maxv=None, factor=float(scale[i]) - 1)(ref)
        ref = ShiftIntensity(float(shift[i]))(ref)
        ref = GaussianSmooth(sigma[i].tolist())(ref) if sigma[i].any() else ref
        torch.testing.assert_close(out[i], torch.as_tensor(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_flip_and_a_transposed_read_are_the_recorded_flips_then_the_turn(spatial_dims):
    # flips and transposes only move voxels: exact equality, every flip set and turn
    patch = torch.rand(2, *(6, 6, 5)[:spatial_dims])
    for code in range(2**spatial_dims):
        flip = torch.tensor([(code >> a) & 1 for a in range(spatial_dims)])
        for k in range(4):
            out = torch.empty_like(patch)
            _resize_flip_turn(patch, patch.shape[1:], flip, k, out)
            axes = [a + 1 for a in range(spatial_dims) if flip[a]]
            assert torch.equal(out, torch.rot90(torch.flip(patch, axes), k, (1, 2)))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cpu_blur_equals_the_batched_blur_and_monai_also_where_the_kernel_outgrows_the_view(
    spatial_dims,
):
    # kernel radius 4 * sigma: 6 voxels at sigma 1.5, more than the 5-voxel axes of the second
    # shape, so taps that fall wholly outside the view are skipped (zero padding)
    for shape in ((20, 18, 16), (5, 9, 4)):
        x = torch.rand(4, 2, *shape[:spatial_dims])
        sigma = torch.tensor([[0.6, 1.5, 0.9], [0.0, 0.0, 0.0], [1.5, 0.5, 1.2], [1.1, 1.1, 0.7]])
        sigma = sigma[:, :spatial_dims]
        cpu = _blur(x.clone(), sigma)
        batched = _blur_batched(x.clone(), sigma, torch.tensor([0, 2, 3]))
        torch.testing.assert_close(cpu, batched, atol=1e-6, rtol=0)
        assert torch.equal(cpu[1], x[1])
        for i in (0, 2, 3):
            ref = torch.as_tensor(GaussianSmooth(sigma[i].tolist())(x[i]))
            torch.testing.assert_close(cpu[i], ref, atol=1e-6, rtol=0)


def test_noise_has_the_drawn_std_and_follows_its_seed_alone():
    x = torch.zeros(3, 1, 32, 32, 32)
    out = _noise(x.clone(), torch.tensor([0.03, 0.0, 0.01]), [7, 8, 9])
    # 32768 draws per sample: the sample std is within 2% of the drawn std
    assert out[0].std().item() == pytest.approx(0.03, rel=0.02) and out[1].abs().max() == 0
    assert out[2].std().item() == pytest.approx(0.01, rel=0.02)
    alone = _noise(x[2:].clone(), torch.tensor([0.01]), [9])
    assert torch.equal(alone[0], out[2])


def test_views_do_not_depend_on_the_batch_or_on_making_them_in_the_collate():
    image = torch.rand(1, 30, 28, 24)
    draw = BoxViewsd(roi_size=ROI, noise_prob=1.0).set_random_state(seed=1)
    samples = [draw({"image": image}) for _ in range(4)]
    together = make_views(collate_boxes(samples), ROI)
    collated = MakeViewsCollate(ROI)(samples)
    for i, sample in enumerate(samples):
        alone = make_views(collate_boxes([sample]), ROI)
        for key in ("view1", "view2"):
            assert torch.equal(alone[key][0], together[key][i])
            assert torch.equal(collated[key][i], together[key][i])
    assert set(together) == {f"view{v}_{r}" for v in (1, 2) for r in ("box", "flip", "rot90")} | {"view1", "view2"}  # fmt: skip


def test_slice_box_reads_arrays_memmaps_and_tensors_alike_and_never_shares_memory(tmp_path):
    data = np.random.default_rng(0).random((1, 12, 10, 8), dtype=np.float32)
    mm = np.lib.format.open_memmap(
        tmp_path / "vol.npy", mode="w+", dtype=np.float16, shape=data.shape
    )
    mm[:] = data
    mm.flush()
    readonly = np.load(tmp_path / "vol.npy", mmap_mode="r")
    lo, hi = (2, 1, 0), (9, 10, 5)
    want = torch.from_numpy(data[:, 2:9, 1:10, 0:5])
    sources = [data, torch.from_numpy(data), MetaTensor(torch.from_numpy(data)), readonly]
    for source in sources:
        patch = slice_box(source, lo, hi)
        assert type(patch) is torch.Tensor and patch.is_contiguous()
        torch.testing.assert_close(patch.float(), want, atol=1e-3, rtol=0)
        patch.fill_(-1)
    assert data.min() >= 0 and readonly.min() >= 0
    assert slice_box(readonly, lo, hi).dtype == torch.float16  # the store's dtype travels


N = 2000  # draws per view; a frequency's standard error is at most 0.5 / sqrt(N) = 0.011


def test_draws_follow_the_config_probabilities_and_ranges():
    draw = BoxViewsd(roi_size=(32, 32, 32)).set_random_state(seed=5)  # the defaults
    views = [[draw.randomize((48, 48, 48), v) for _ in range(N)] for v in (0, 1)]
    for v, blur_p in ((0, 1.0), (1, 0.1)):
        d = {k: np.stack([p[k] for p in views[v]]) for k in views[v][0]}
        frac = np.prod(d["box"][..., 1] - d["box"][..., 0], axis=1) / 48**3
        assert frac.min() >= 0.2 * 0.99 and frac.max() <= 1.0
        assert frac.mean() == pytest.approx(0.6, abs=0.02)  # uniform in [0.2, 1]: sd 0.005
        sides = (d["box"][..., 1] - d["box"][..., 0]).astype(float)
        for a, b in ((0, 1), (0, 2), (1, 2)):
            assert (sides[:, b] / sides[:, a]).min() >= 0.75 * 0.99
            assert (sides[:, b] / sides[:, a]).max() <= 4 / 3 * 1.01
        np.testing.assert_allclose(d["flip"].mean(axis=0), 0.5, atol=0.04)
        k = np.bincount(d["rot90"], minlength=4) / N
        np.testing.assert_allclose(k, [0.5, 1 / 6, 1 / 6, 1 / 6], atol=0.035)
        on = d["gamma"] > 0
        assert on.mean() == pytest.approx(0.5, abs=0.04)
        assert d["gamma"][on].min() >= 0.7 and d["gamma"][on].max() <= 1.5
        assert d["gamma"][on].mean() == pytest.approx(1.1, abs=0.02)
        jit = d["scale"] != 1.0
        assert jit.mean() == pytest.approx(0.8, abs=0.035) and np.all(d["shift"][~jit] == 0)
        assert np.abs(d["scale"][jit] - 1).max() <= 0.1 and np.abs(d["shift"][jit]).max() <= 0.1
        blur = d["sigma"].max(axis=1) > 0
        assert blur.mean() == pytest.approx(blur_p, abs=0.03)
        assert d["sigma"][blur].min() >= 0.5 and d["sigma"][blur].max() <= 1.5
        noisy = d["noise_std"] > 0
        assert noisy.mean() == pytest.approx(0.2, abs=0.035)
        assert d["noise_std"].max() <= 0.03 and d["noise_std"][noisy].mean() == pytest.approx(0.015, abs=0.002)  # fmt: skip


def test_geometry_records_match_the_cpu_paths_distribution():
    # 300 samples of each path: a mean fraction's standard error is about 0.23 / sqrt(600) =
    # 0.01 per path, a frequency's at most 0.5 / sqrt(600) = 0.02 (tolerances about 3.5 sd of
    # the difference)
    shape = (20, 18, 16)
    cpu = view_transforms(roi_size=(16, 16, 16), **PLAIN)
    cpu.set_random_state(seed=2)
    draw = BoxViewsd(roi_size=(16, 16, 16)).set_random_state(seed=2)
    a = [cpu({"image": torch.rand(1, *shape)}) for _ in range(300)]
    a = [{k.split("_", 1)[1]: s[k] for k in s if k.startswith(v + "_")} for s in a for v in ("view1", "view2")]  # fmt: skip
    b = [draw.randomize(shape, v) for _ in range(300) for v in (0, 1)]

    def mean_fraction(draws):
        return np.mean([np.prod(s["box"][:, 1] - s["box"][:, 0]) for s in draws]) / np.prod(shape)

    assert mean_fraction(a) == pytest.approx(mean_fraction(b), abs=0.05)
    flips = [np.mean([s["flip"] for s in draws], axis=0) for draws in (a, b)]
    np.testing.assert_allclose(flips[0], flips[1], atol=0.1)
    turns = [np.bincount([int(s["rot90"]) for s in d], minlength=4) / len(d) for d in (a, b)]
    np.testing.assert_allclose(turns[0], turns[1], atol=0.1)


def test_device_view_loader_makes_views_and_passes_len_and_sampler_through():
    image = torch.rand(1, 30, 28, 24)
    draw = BoxViewsd(roi_size=ROI).set_random_state(seed=0)
    data = [draw({"image": image}) for _ in range(5)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate_boxes)
    wrapped = DeviceViewLoader(loader, ROI, "cpu", memory_format=torch.channels_last_3d)
    batches = list(wrapped)
    assert len(wrapped) == 3 and wrapped.sampler is loader.sampler
    assert [b["view1"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["view2"].is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(batches[0]["view1"], make_views(collate_boxes(data[:2]), ROI)["view1"])


def test_config_switch_builds_the_batched_views_and_rejects_bad_values():
    cfg = load_config(None, ["transforms.views=batched", "transforms.roi_size=[32,32,32]"])
    _, views = build_transforms(cfg)
    assert isinstance(views, BoxViewsd) and views.probs["blur_prob"] == (1.0, 0.1)
    with pytest.raises(ConfigError, match="transforms.views"):
        load_config(None, ["transforms.views=gpu"])


@pytest.mark.parametrize(
    "per_sample, drawer",
    [("byol3d.transforms.volume_views.view_transforms", "byol3d.transforms.batched.BoxViewsd"),
     ("byol3d.transforms.frames.frame_views", "byol3d.transforms.batched.FrameBoxViewsd")],
)  # fmt: skip
def test_batched_drawers_take_the_per_sample_paths_arguments_and_defaults(per_sample, drawer):
    """One config feeds either path (transforms.views), so names and defaults must not drift."""
    import importlib
    import inspect

    def params(dotted):
        module, name = dotted.rsplit(".", 1)
        signature = inspect.signature(getattr(importlib.import_module(module), name))
        return {p.name: p.default for p in signature.parameters.values() if p.name != "self"}

    assert params(drawer) == params(per_sample)
