from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from byol3d.data.discovery import find_frames, list_images, read_image_list
from byol3d.data.readers import frame_loader
from byol3d.errors import DataError


def _png(path, mode="RGB", size=(20, 12), value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if mode in ("RGB", "RGBA"):
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        if value is not None:
            arr[:] = value
        Image.fromarray(arr, mode).save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    elif mode == "P":
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(
            "P", palette=Image.ADAPTIVE
        ).save(path)
    elif mode == "I;16":
        arr = np.full((size[1], size[0]), 65535, dtype=np.uint16)
        arr[:, : size[0] // 2] = 0
        Image.fromarray(arr).save(path)
    return path


def test_find_frames_is_recursive_sorted_and_skips_hidden(tmp_path):
    for rel in ["v2/b.png", "v1/a.JPG", "v1/c.jpeg", "top.bmp", ".hidden/x.png", "v1/.y.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    found = find_frames(tmp_path)
    assert found == [str(tmp_path / r) for r in ["top.bmp", "v1/a.JPG", "v1/c.jpeg", "v2/b.png"]]


def test_find_frames_errors_name_the_folder_and_point_videos_to_extraction(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_frames(tmp_path / "missing")
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "a.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"found 2 files .*extract-frames"):
        find_frames(tmp_path)


def test_read_image_list_resolves_paths_and_ids_and_keeps_labels_optional(tmp_path):
    _png(tmp_path / "images" / "0001.png")
    _png(tmp_path / "images" / "0002.jpg")
    _png(tmp_path / "other" / "x.png")
    (tmp_path / "ids.csv").write_text("id,label\n0001,3\n0002,\n")
    rows = read_image_list(tmp_path / "ids.csv", root=tmp_path)
    assert rows == [
        {"image": str(tmp_path / "images" / "0001.png"), "id": "0001", "label": "3"},
        {"image": str(tmp_path / "images" / "0002.jpg"), "id": "0002"},
    ]
    # path column, no label column at all, root defaults to the CSV's folder
    (tmp_path / "paths.csv").write_text(f"path\nother/x.png\n{tmp_path / 'images' / '0001.png'}\n")
    rows = read_image_list(tmp_path / "paths.csv")
    assert [r["image"] for r in rows] == [
        str(tmp_path / "other" / "x.png"),
        str(tmp_path / "images" / "0001.png"),
    ]
    assert all("label" not in r for r in rows) and rows[0]["id"] == "x"
    assert list_images(root=tmp_path, csv=tmp_path / "ids.csv", spatial_dims=2) == [
        str(tmp_path / "images" / "0001.png"),
        str(tmp_path / "images" / "0002.jpg"),
    ]


def test_read_image_list_names_the_missing_file_and_its_line(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("path,label\na.png,0\nmissing.png,1\n")
    with pytest.raises(DataError) as info:
        read_image_list(tmp_path / "l.csv", root=tmp_path)
    message = str(info.value)
    assert "line 3" in message and str(tmp_path / "missing.png") in message
    assert "\n" not in message
    (tmp_path / "id.csv").write_text("id\nnope\n")
    with pytest.raises(DataError, match=r"line 2: no image for id 'nope'"):
        read_image_list(tmp_path / "id.csv", root=tmp_path)


def test_read_image_list_rejects_bad_columns_duplicates_and_empty_lists(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "cols.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(
        DataError, match=r"needs a 'path' or an 'id' column, found columns \['file', 'label'\]"
    ):
        read_image_list(tmp_path / "cols.csv")
    (tmp_path / "dup.csv").write_text("path\na.png\n./a.png\n")
    with pytest.raises(DataError, match="line 3: .*a.png is already listed on line 2"):
        read_image_list(tmp_path / "dup.csv")
    (tmp_path / "empty.csv").write_text("path\n")
    with pytest.raises(DataError, match="lists no images"):
        read_image_list(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="cannot read data.csv"):
        read_image_list(tmp_path / "absent.csv")


def test_a_csv_lists_volumes_too(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ct_001.nii.gz").write_bytes(b"")
    (tmp_path / "list.csv").write_text("id\nct_001\n")
    assert list_images(root=tmp_path, csv=tmp_path / "list.csv", spatial_dims=3) == [
        str(tmp_path / "images" / "ct_001.nii.gz")
    ]


def test_list_images_needs_a_root_or_a_csv():
    with pytest.raises(DataError, match="data.root is not set"):
        list_images(root=None, csv=None, spatial_dims=2)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "I;16"])
def test_frame_loader_gives_three_uint8_channels_for_any_mode(tmp_path, mode):
    path = _png(tmp_path / f"f_{mode.replace(';', '')}.png", mode=mode, size=(20, 12))
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
    from byol3d.data.readers import find_data_error

    err = find_data_error(info.value)
    assert err is not None and str(tmp_path / "bad.png") in str(err)
