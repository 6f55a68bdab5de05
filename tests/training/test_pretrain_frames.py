"""2D frames through the same ``pretrain``: folders, CSV lists, odd frames, errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from byol3d.cli import main
from byol3d.config import load_config
from byol3d.data.synthetic_frames import write_endoscopy_dataset
from byol3d.errors import DataError
from byol3d.models.encoders import build_encoder
from byol3d.training.pretrain import pretrain

TINY_2D = [
    "data.spatial_dims=2",
    "data.in_channels=3",
    "model.encoder=resnet10",
    "model.hidden_dim=32",
    "model.projection_dim=16",
    "transforms.roi_size=[32,32]",
    "transforms.blur_sigma=[0.1,0.5]",
    "train.batch_size=2",
    "train.max_epochs=1",
    "train.warmup_epochs=0",
    "train.lr=1e-3",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
    "data.cache=none",
    "data.num_workers=0",
    "data.val_fraction=0",
]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("endo")
    write_endoscopy_dataset(root, n=6, videos=2, size=(48, 40), seed=0)
    return root


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_a_folder_of_frames_pretrains(frames, tmp_path):
    cfg = load_config(None, [*TINY_2D, f"data.root={frames / 'images'}", f"output_dir={tmp_path}"])
    result = pretrain(cfg)
    assert result.iterations == 3 and result.epochs == 1
    metrics = _rows(tmp_path / "metrics.csv")
    assert len(metrics) == 3 and all(np.isfinite(float(r["loss"])) for r in metrics)
    encoder = build_encoder("resnet10", spatial_dims=2, in_channels=3)
    encoder.load_state_dict(torch.load(result.encoder_path, weights_only=True), strict=True)


def test_frames_pretrain_with_the_dense_term(frames, tmp_path):
    # the 2D views record their horizontal flips, so the local term finds its correspondences
    extra = ["model.dense_weight=1.0", "model.dense_layer=layer1", "model.dense_grid=3"]
    cfg = load_config(
        None, [*TINY_2D, *extra, f"data.root={frames / 'images'}", f"output_dir={tmp_path}"]
    )
    result = pretrain(cfg)
    metrics = _rows(tmp_path / "metrics.csv")
    assert result.iterations == 3 and len(metrics) == 3
    dense = [float(r["dense"]) for r in metrics]
    assert all(0.0 < d <= 8.0 for d in dense)  # 2 - 2 cos per point, both directions


def test_batched_frame_views_pretrain_and_resume_exactly(frames, tmp_path):
    # transforms.views batched: boxes drawn in the loader, views made per batch (on a CPU in
    # the collate), for training and validation; the dense term reads their records; an
    # interrupted run resumes exactly
    extra = ["transforms.views=batched", "train.max_epochs=2", "data.cache=cache", "data.val_fraction=0.34",
             "model.dense_weight=1.0", "model.dense_layer=layer1", "model.dense_grid=3"]  # fmt: skip
    cfg = load_config(None, [*TINY_2D, *extra, f"data.root={frames / 'images'}", f"output_dir={tmp_path}"])  # fmt: skip
    straight = pretrain(cfg)
    assert straight.iterations == 4  # 4 training frames, batch 2, 2 epochs
    metrics = _rows(tmp_path / "metrics.csv")
    assert all(np.isfinite(float(r["loss"])) and 0.0 < float(r["dense"]) <= 8.0 for r in metrics)
    assert all(float(r["val_loss"]) >= 0 for r in _rows(tmp_path / "epochs.csv"))
    final = torch.load(straight.checkpoint, weights_only=True)
    straight.checkpoint.unlink()  # interrupted after epoch 1's checkpoint
    resumed = pretrain(cfg)
    assert resumed.resumed_from == tmp_path / "checkpoints" / "checkpoint_1.pt"
    again = torch.load(resumed.checkpoint, weights_only=True)
    assert again["trainer"]["iteration"] == 4
    for key, value in final["model"].items():
        assert torch.equal(value, again["model"][key]), key


def test_a_csv_list_pretrains_with_or_without_labels(frames, tmp_path):
    cfg = load_config(
        None,
        [
            *TINY_2D,
            f"data.csv={frames / 'frames.csv'}",
            f"data.root={frames}",
            "data.val_fraction=0.34",
            "data.cache=cache",
            f"output_dir={tmp_path / 'labelled'}",
        ],
    )
    result = pretrain(cfg)
    assert result.iterations == 2  # 4 training frames, 2 for validation
    epochs = _rows(tmp_path / "labelled" / "epochs.csv")
    assert np.isfinite(float(epochs[0]["val_loss"]))
    # paths only, absolute, no label column
    unlabelled = tmp_path / "paths.csv"
    unlabelled.write_text(
        "path\n" + "".join(f"{frames / r['path']}\n" for r in _rows(frames / "frames.csv")[:4])
    )
    cfg = load_config(
        None, [*TINY_2D, f"data.csv={unlabelled}", f"output_dir={tmp_path / 'unlabelled'}"]
    )
    assert pretrain(cfg).iterations == 2


def test_grey_and_rgba_frames_in_an_rgb_dataset_are_converted(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA").save(
        root / "rgba.png"
    )
    Image.fromarray(rng.integers(0, 256, (36, 50, 3), dtype=np.uint8)).save(root / "photo.jpg")
    cfg = load_config(None, [*TINY_2D, f"data.root={root}", f"output_dir={tmp_path / 'run'}"])
    assert pretrain(cfg).iterations == 2


def test_a_csv_naming_a_missing_file_is_a_one_line_error(frames, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,path,label\na,images/video_00/frame_000.png,0\nb,images/nope.png,1\n")
    cfg = load_config(
        None, [*TINY_2D, f"data.csv={bad}", f"data.root={frames}", f"output_dir={tmp_path / 'r'}"]
    )
    with pytest.raises(DataError, match=r"line 3: image .*images/nope.png does not exist"):
        pretrain(cfg)
    code = main(
        [
            "pretrain",
            "--quiet",
            "configs/demo_endoscopy.yaml",
            f"data.csv={bad}",
            f"data.root={frames}",
            f"output_dir={tmp_path / 'cli'}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert (
        err[0].startswith("byol3d: error: CSV list") and "images/nope.png does not exist" in err[0]
    )


def test_an_unreadable_frame_is_named(tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "b.png").write_bytes(b"\x89PNG not really")
    cfg = load_config(None, [*TINY_2D, f"data.root={root}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="b.png"):
        pretrain(cfg)
    skip = load_config(
        None,
        [*TINY_2D, f"data.root={root}", "data.on_bad_file=skip", f"output_dir={tmp_path / 's'}"],
    )
    assert pretrain(skip).iterations == 1
    assert "b.png" in (tmp_path / "s" / "skipped_files.txt").read_text()


def test_stats_and_preview_commands_on_frames(frames, tmp_path, capsys):
    code = main(["stats", "configs/demo_endoscopy.yaml", f"data.root={frames / 'images'}"])
    out = capsys.readouterr().out
    assert code == 0 and "per-channel mean/std of 6 preprocessed images" in out
    line = next(x for x in out.splitlines() if x.startswith("or as overrides"))
    overrides = line.split(": ", 1)[1].split()
    cfg = load_config("configs/demo_endoscopy.yaml", overrides)
    mean = cfg["transforms"]["mean"]
    assert len(mean) == 3 and mean[0] > mean[1] and mean[0] > mean[2]  # red tissue
    png = tmp_path / "views.png"
    code = main(
        [
            "preview",
            "configs/demo_endoscopy.yaml",
            f"data.root={frames / 'images'}",
            "--n",
            "2",
            "--output",
            str(png),
        ]
    )
    assert code == 0 and png.is_file() and png.stat().st_size > 1000
    batched = tmp_path / "batched.png"  # the batched views, a batch of one per frame
    code = main(["preview", "configs/demo_endoscopy.yaml", f"data.root={frames / 'images'}",
                 "transforms.views=batched", "--n", "2", "--output", str(batched)])  # fmt: skip
    assert code == 0 and batched.stat().st_size > 1000


@pytest.mark.parametrize("name", ["endoscopy_resnet50", "demo_endoscopy"])
def test_shipped_2d_configs_load_and_build_their_transforms(name, tmp_path):
    from byol3d.transforms import build_transforms

    cfg = load_config(f"configs/{name}.yaml", [f"data.root={tmp_path}"])
    assert cfg["data"]["spatial_dims"] == 2 and cfg["data"]["in_channels"] == 3
    assert cfg["transforms"]["solarize_prob"] == [0.0, 0.2]
    assert cfg["transforms"]["blur_prob"] == [1.0, 0.1]
    assert cfg["transforms"]["scale"] == [0.08, 1.0]
    _, views = build_transforms(cfg)
    roi = cfg["transforms"]["roi_size"]
    out = views({"image": torch.randint(0, 256, (3, roi[0] + 16, roi[1] + 8), dtype=torch.uint8)})
    assert tuple(out["view1"].shape) == (3, *roi) and out["view2"].dtype == torch.float32


def _flat_frames(folder, n, seed=0):
    """``n`` black frames with sensor noise (std about 1 grey level) and one constant grey one."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.normal(3, 1, size=(40, 48, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(noise).save(folder / f"black_{i:03d}.png")
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(folder / "grey.png")


def test_black_frames_are_one_summary_line_and_min_frame_std_drops_them(frames, tmp_path, caplog):
    import logging
    import shutil

    root = tmp_path / "frames"
    shutil.copytree(frames / "images", root)
    _flat_frames(root / "out_of_body", 4)
    overrides = [*TINY_2D, f"data.root={root}", "data.cache=cache"]
    with caplog.at_level(logging.INFO, logger="byol3d"):
        pretrain(load_config(None, [*overrides, f"output_dir={tmp_path / 'kept'}"]))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    flat = [m for m in warned if "near-black" in m]
    assert len(flat) == 2, flat  # the first one seen, then the total: never one line each
    assert flat[1] == "5 constant or near-black frames (data.min_frame_std drops such frames before training)"  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="byol3d"):
        result = pretrain(load_config(None, [*overrides, f"output_dir={tmp_path / 'dropped'}", "data.min_frame_std=0.02"]))  # fmt: skip
    assert result.iterations == 3  # the 6 real frames, batch 2
    lines = [r.getMessage() for r in caplog.records]
    assert any("data.min_frame_std 0.02: dropped 5 of 11 frames" in m for m in lines)
    assert not any("near-black frame" in m for m in lines)
    listed = (tmp_path / "dropped" / "dropped_frames.txt").read_text().splitlines()
    assert len(listed) == 5 and all(float(line.split("\t")[1]) < 0.02 for line in listed)


def test_frame_std_measures_what_the_filter_drops(tmp_path):
    from byol3d.data.frame_reader import frame_std

    _flat_frames(tmp_path, 1)
    a = np.zeros((40, 48, 3), np.uint8)
    a[:, 24:] = 255  # half black, half white: std 0.5
    Image.fromarray(a).save(tmp_path / "half.png")
    assert frame_std(tmp_path / "grey.png") == 0.0
    assert frame_std(tmp_path / "half.png") == pytest.approx(0.5, abs=1e-6)
    assert 0.0 < frame_std(tmp_path / "black_000.png") < 0.01
    assert np.isnan(frame_std(tmp_path / "missing.png"))
