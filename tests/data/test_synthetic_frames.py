from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from byol3d.cli import main
from byol3d.data.synthetic_frames import CLASS_NAMES, endoscopy_frame, write_endoscopy_dataset


def _centre(frame):
    h, w = frame.shape[:2]
    return frame[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].astype(float) / 255


def test_frame_shape_vignette_and_tissue_colour():
    frame = endoscopy_frame(size=(96, 80), label=0, seed=0)
    assert frame.shape == (80, 96, 3) and frame.dtype == np.uint8
    assert frame[:4, :4].max() < 20 and frame[-4:, -4:].max() < 20  # dark corners
    r, g, b = _centre(frame).reshape(-1, 3).mean(0)
    assert r > 0.45 and r > 1.6 * g and r > 1.6 * b  # pink-red tissue
    assert np.array_equal(frame, endoscopy_frame(size=(96, 80), label=0, seed=0))
    assert not np.array_equal(frame, endoscopy_frame(size=(96, 80), label=0, seed=1))


def test_classes_make_visible_differences():
    def grey_fraction(f):  # metallic: bright and unsaturated
        c = _centre(f)
        return float(((c.min(-1) > 0.4) & (c.max(-1) - c.min(-1) < 0.15)).mean())

    def blood_fraction(f):  # dark red
        c = _centre(f)
        return float(((c[..., 0] < 0.5) & (c[..., 0] > 2.5 * c[..., 1])).mean())

    frames = {
        label: [endoscopy_frame(size=(96, 96), label=label, seed=s) for s in range(6)]
        for label in range(3)
    }
    grey = {k: np.mean([grey_fraction(f) for f in v]) for k, v in frames.items()}
    blood = {k: np.mean([blood_fraction(f) for f in v]) for k, v in frames.items()}
    assert grey[1] > 0.05 and grey[1] > 5 * max(grey[0], grey[2], 1e-3)
    assert blood[2] > 0.1 and blood[2] > 5 * max(blood[0], blood[1], 1e-3)


def test_frame_rejects_bad_arguments():
    with pytest.raises(ValueError, match="label"):
        endoscopy_frame(label=3)
    with pytest.raises(ValueError, match="size"):
        endoscopy_frame(size=(8, 64))


def test_label_maps_mark_the_drawn_instrument_and_blood():
    for label, want in ((1, 1), (2, 2)):
        frame, mask = endoscopy_frame(size=(96, 80), label=label, seed=3, with_mask=True)
        assert np.array_equal(frame, endoscopy_frame(size=(96, 80), label=label, seed=3))
        inside, outside = frame[mask == want].astype(float), frame[mask == 0].astype(float)
        assert 0.02 < (mask == want).mean() < 0.5 and set(np.unique(mask).tolist()) == {0, want}
        if want == 1:  # the shaft is grey: red and blue nearly equal, unlike the pink tissue
            assert (
                np.abs(inside[:, 0] - inside[:, 2]).mean()
                < 25
                < np.abs(outside[:, 0] - outside[:, 2]).mean()
            )
        else:  # blood is darker and redder than tissue
            assert inside[:, 1].mean() < 0.5 * outside[:, 1].mean()
    _, mask = endoscopy_frame(size=(96, 80), label=0, seed=3, with_mask=True)
    assert not mask.any()


def test_dataset_layout_csv_and_balance(tmp_path):
    paths = write_endoscopy_dataset(tmp_path, n=12, videos=3, size=(48, 40), seed=0)
    assert len(paths) == 12 and all(p.is_file() for p in paths)
    assert paths[4] == tmp_path / "images" / "video_01" / "frame_001.png"
    assert Image.open(paths[0]).size == (48, 40) and Image.open(paths[0]).mode == "RGB"
    with open(tmp_path / "frames.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "path", "label", "label_name", "segmentation"]
    masks = [np.asarray(Image.open(tmp_path / r["segmentation"])) for r in rows]
    assert masks[0].shape == (40, 48) and masks[0].dtype == np.uint8
    # a frame's label map holds only its class's pixel label: none for tissue frames
    assert [set(np.unique(m).tolist()) - {0} for m in masks[:9:3]] == [set(), {1}, {2}]
    assert [(tmp_path / r["path"]) for r in rows] == paths
    labels = [int(r["label"]) for r in rows]
    assert labels == [(i // 3) % 3 for i in range(12)]
    assert [r["label_name"] for r in rows[:9:3]] == list(CLASS_NAMES)
    # a smaller rewrite leaves no stale frames
    write_endoscopy_dataset(tmp_path, n=3, videos=1, size=(48, 40))
    assert len(list((tmp_path / "labels").rglob("*.png"))) == 3
    assert sorted(p.name for p in (tmp_path / "images").rglob("*.png")) == [
        "frame_000.png",
        "frame_001.png",
        "frame_002.png",
    ]
    with pytest.raises(ValueError, match="videos"):
        write_endoscopy_dataset(tmp_path, n=2, videos=3)


def test_cli_writes_endoscopy_frames(tmp_path, capsys):
    out = tmp_path / "endo"
    code = main(
        [
            "demo-data",
            str(out),
            "--kind",
            "endoscopy",
            "--n",
            "4",
            "--videos",
            "2",
            "--frame-size",
            "40",
            "32",
        ]
    )
    assert code == 0
    assert "wrote 4 endoscopy frames" in capsys.readouterr().out
    assert len(list((out / "images").rglob("*.png"))) == 4 and (out / "frames.csv").is_file()
    assert main(["demo-data", str(out), "--kind", "endoscopy", "--n", "0"]) == 2
