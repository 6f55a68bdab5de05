from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from byol3d.data.discovery import find_frames, list_images, read_image_list
from byol3d.errors import DataError


def write_png(path, mode="RGB", size=(20, 12), value=None):
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
    write_png(tmp_path / "images" / "0001.png")
    write_png(tmp_path / "images" / "0002.jpg")
    write_png(tmp_path / "other" / "x.png")
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
    write_png(tmp_path / "a.png")
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
    write_png(tmp_path / "a.png")
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
    with pytest.raises(DataError, match="cannot read CSV list"):
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
