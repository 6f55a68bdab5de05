"""Evaluation sees what training saw: build_eval_transform against the training views."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from byol3d.config import load_config
from byol3d.transforms import build_eval_transform


def _frame(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def _no_augmentation_2d(overrides=()):
    return load_config(None, ["data.spatial_dims=2", "data.in_channels=3", "transforms.roi_size=[32,32]",
                              "transforms.scale=[1.0,1.0]", "transforms.ratio=[1.0,1.0]",
                              "transforms.flip_prob=0.0", "transforms.colour_jitter_prob=0.0",
                              "transforms.grayscale_prob=0.0", "transforms.blur_prob=0.0",
                              "transforms.solarize_prob=0.0", *overrides])  # fmt: skip


def test_2d_eval_input_equals_an_unaugmented_training_view(tmp_path):
    from byol3d.transforms import build_transforms

    cfg = _no_augmentation_2d(["transforms.mean=[0.3,0.4,0.5]", "transforms.std=[0.2,0.25,0.3]"])
    path = _frame(tmp_path / "f.png")
    preprocess, views = build_transforms(cfg)
    view = views(preprocess({"image": path}))["view1"]
    seen = build_eval_transform(cfg)({"image": path})["image"]
    torch.testing.assert_close(torch.as_tensor(seen).float(), view, atol=1e-5, rtol=1e-5)


def test_2d_eval_input_is_normalised_not_raw_pixels(tmp_path):
    cfg = _no_augmentation_2d(["transforms.mean=[0.5]", "transforms.std=[0.25]"])
    path = _frame(tmp_path / "f.png", seed=1)
    raw = torch.as_tensor(np.array(Image.open(path)), dtype=torch.float32).permute(2, 1, 0)
    seen = torch.as_tensor(build_eval_transform(cfg)({"image": path})["image"]).float()
    torch.testing.assert_close(seen, (raw / 255.0 - 0.5) / 0.25, atol=1e-5, rtol=1e-5)
    assert seen.abs().max() < 2.5  # raw pixels would be up to 255


def test_3d_eval_input_is_the_deterministic_preprocessing(tmp_path):
    from byol3d.data.synthetic_ct import write_demo_dataset
    from byol3d.transforms import build_transforms

    write_demo_dataset(tmp_path, n=1, shape=(32, 32, 24), spacing=(8.0, 8.0, 10.0))
    cfg = load_config(None, ["transforms.roi_size=[32,32,32]", "transforms.pixdim=[8.0,8.0,8.0]"])
    path = str(tmp_path / "images" / "ct_000.nii.gz")
    want = build_transforms(cfg)[0]({"image": path})["image"]
    got = build_eval_transform(cfg)({"image": path})["image"]
    torch.testing.assert_close(got.as_tensor(), want.as_tensor())
