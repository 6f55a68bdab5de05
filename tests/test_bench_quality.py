"""scripts/bench_quality.py and bench_photos.py: the photo tiles and the table maths (no training)."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from byol3d.data.discovery import read_image_list
from byol3d.evaluation.stats import paired_difference

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def test_tiles_do_not_overlap_and_take_the_band_of_their_centre():
    photos = load("bench_photos")
    img = np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    tiles = photos.tile_photo("p", img, tile=20, size=24)
    assert len(tiles) == 5 * 6  # 100 // 20 rows, 130 // 20 columns
    covered = np.zeros(img.shape[:2], dtype=int)
    for t in tiles:
        top, left, bottom, right = t.box
        covered[top:bottom, left:right] += 1
        centre = (top + bottom) / 2
        assert t.label == f"p_{photos.BANDS[int(centre * 3 / 100)]}"
        assert t.pixels.shape == (24, 24, 3) and t.pixels.dtype == np.uint8
    assert covered.max() == 1  # no pixel in two tiles: CV folds share no image content
    assert covered.sum() == 30 * 20 * 20
    # the grid is centred: 130 - 6 * 20 = 10 columns left over, 5 on each side
    assert min(t.box[1] for t in tiles) == 5


def test_unresized_tiles_are_the_photo_pixels():
    photos = load("bench_photos")
    img = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for t in photos.tile_photo("q", img, tile=20, size=20):
        top, left, bottom, right = t.box
        np.testing.assert_array_equal(t.pixels, img[top:bottom, left:right])


def test_a_photo_smaller_than_a_tile_is_refused():
    photos = load("bench_photos")
    with pytest.raises(ValueError, match="smaller than one 48-pixel tile"):
        photos.tile_photo("tiny", np.zeros((30, 60, 3), dtype=np.uint8), tile=48)


def test_bundled_photos_give_a_few_hundred_tiles_in_nine_classes(tmp_path):
    photos = load("bench_photos")
    tiles = photos.photo_tiles(tile=48, size=64)
    assert len(tiles) == 104 + 104 + 120  # china, flower (427 x 640), grace_hopper (600 x 512)
    labels = {t.label for t in tiles}
    assert len(labels) == 9
    csv_path = photos.write_tiles(tiles[::30], tmp_path)
    rows = read_image_list(csv_path, require_label=True)
    assert [r["label"] for r in rows] == [t.label for t in tiles[::30]]
    assert all(Path(r["image"]).is_file() for r in rows)
    with open(csv_path) as fh:
        assert next(csv.reader(fh)) == ["path", "label"]


def _records():
    acc = {  # seed -> side -> (probe, knn)
        0: {"byol3d": (0.80, 0.70), "lightly": (0.78, 0.72), "random": (0.70, 0.60)},
        1: {"byol3d": (0.82, 0.74), "lightly": (0.79, 0.70), "random": (0.71, 0.62)},
        2: {"byol3d": (0.84, 0.75), "lightly": (0.80, 0.71), "random": (0.69, 0.58)},
    }
    return [
        {"seed": s, "side": side, "linear_probe": p, "knn": k}
        for s, sides in acc.items()
        for side, (p, k) in sides.items()
    ]


def test_summary_pairs_seeds_and_the_ratio_is_a_quotient_of_means():
    quality = load("bench_quality")
    out = quality.summarise(_records())
    knn = {side: [r["knn"] for r in _records() if r["side"] == side] for side in quality.SIDES}
    assert math.isclose(out["summary"]["byol3d/knn"]["mean"], np.mean(knn["byol3d"]))
    assert math.isclose(out["summary"]["lightly/knn"]["sd"], np.std(knn["lightly"], ddof=1))
    expect = round(np.mean(knn["byol3d"]) / np.mean(knn["lightly"]), 4)
    assert out["ratios"]["quality_knn_vs_lightly"] == expect
    d = paired_difference(knn["byol3d"], knn["lightly"])
    got = out["paired"]["byol3d-lightly/knn"]
    assert math.isclose(got["mean_difference"], 0.02) and math.isclose(got["ci_low"], d.ci_low)
    assert got["text"] == d.format()


def test_a_missing_side_leaves_its_pairs_and_ratios_out():
    quality = load("bench_quality")
    records = [
        {**r, "steps": 500, "train_seconds": 60.0} for r in _records() if r["side"] != "lightly"
    ]
    out = quality.summarise(records)
    assert out["ratios"]["quality_knn_vs_lightly"] is None
    assert out["ratios"]["quality_knn_vs_random"] is not None
    assert "byol3d-lightly/knn" not in out["paired"] and "byol3d-random/knn" in out["paired"]
    result = {"setup": {**vars(quality.QualitySetup()), "epochs": 50, "steps_per_epoch": 10},
              "data": {"n_images": 328, "classes": {"a": 1}, "chance": 0.12},
              "records": records, **out}  # fmt: skip
    table = quality.quality_markdown(result)
    assert "| lightly | not installed |" in table and "| byol3d - random |" in table
    table = quality.quality_markdown({**result, "sides": ["byol3d", "random"]})
    assert "| lightly | not run (--sides) |" in table


def test_epochs_cover_the_requested_steps():
    quality = load("bench_quality")
    s = quality.QualitySetup(batch=32, steps=500)
    assert s.epochs(328) == 50  # 10 full batches per epoch
    assert s.epochs(330) * (330 // 32) >= 500
    assert quality.QualitySetup(batch=32, steps=45).epochs(328) == 5
