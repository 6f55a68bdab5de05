from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from byol3d.data.frame_reader import frame_loader
from byol3d.data.readers import find_data_error
from tests.data.test_discovery import write_png


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "I;16"])
def test_frame_loader_gives_three_uint8_channels_for_any_mode(tmp_path, mode):
    path = write_png(tmp_path / f"f_{mode.replace(';', '')}.png", mode=mode, size=(20, 12))
    img = frame_loader("image", channels=3)({"image": str(path)})["image"]
    assert tuple(img.shape) == (20, 12, 3)  # (W, H, C): MONAI's PIL order
    assert img.dtype == torch.uint8
    if mode == "L":  # grey replicated into the three channels
        assert torch.equal(img[..., 0], img[..., 1]) and torch.equal(img[..., 1], img[..., 2])
    if mode == "I;16":  # 16-bit rescaled, not clipped: 0 -> 0 and 65535 -> 255
        assert img[0, 0, 0] == 0 and img[-1, 0, 0] == 255


def test_frame_loader_composites_transparent_pixels_on_black(tmp_path):
    arr = np.zeros((4, 6, 4), dtype=np.uint8)
    arr[..., :3] = 200
    arr[:, :3, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = frame_loader("image")({"image": str(tmp_path / "a.png")})["image"]
    assert img[:3].eq(200).all() and img[3:].eq(0).all()


def test_frame_loader_names_an_unreadable_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(Exception) as info:
        frame_loader("image")({"image": str(tmp_path / "bad.png")})
    err = find_data_error(info.value)
    assert err is not None and str(tmp_path / "bad.png") in str(err)
