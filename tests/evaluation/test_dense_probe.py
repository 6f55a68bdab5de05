from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from byol3d.data.discovery import segmentation_pairs
from byol3d.data.synthetic_ct import write_demo_dataset
from byol3d.errors import DataError
from byol3d.evaluation.dense_probe import (
    DenseFeatures,
    _features_at,
    dense_probe_run,
    fit_linear_probe,
    format_dense_report,
    predict_volume,
    volume_features,
)
from byol3d.evaluation.features import load_encoder
from byol3d.models.correspondence import upsample_to_voxels
from byol3d.models.encoders import build_encoder
from tests.evaluation.test_export import write_run


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_upsampling_puts_cell_j_on_voxel_stride_times_j(dims):
    torch.manual_seed(0)
    cells = (3, 4, 2)[:dims]
    fmap = torch.randn(1, 2, *cells)
    size = [4 * n - 1 for n in cells]  # ceil(size / 4) == cells
    up = upsample_to_voxels(fmap, size, stride=4)
    assert up.shape == (1, 2, *size)
    for j in np.ndindex(*cells):
        torch.testing.assert_close(
            up[(0, slice(None), *(4 * np.array(j)))], fmap[(0, slice(None), *j)]
        )
    # halfway between two cells along the first axis: their mean
    mid = up[(0, slice(None), 2, *([0] * (dims - 1)))]
    torch.testing.assert_close(mid, fmap[(0, slice(None), 0, *([0] * (dims - 1)))] / 2 + fmap[(0, slice(None), 1, *([0] * (dims - 1)))] / 2)  # fmt: skip


def test_sampled_features_equal_the_upsampled_maps_at_those_voxels():
    torch.manual_seed(0)
    size = (30, 21, 17)
    maps = {"a": torch.randn(3, 8, 6, 5), "b": torch.randn(2, 4, 3, 3)}
    feats = DenseFeatures(maps, {"a": 4, "b": 8}, size, torch.zeros(size, dtype=torch.long))
    idx = torch.randperm(int(np.prod(size)))[:50]
    got = _features_at(feats, idx)
    full = torch.cat([upsample_to_voxels(maps["a"][None], size, 4)[0], upsample_to_voxels(maps["b"][None], size, 8)[0]])  # fmt: skip
    want = full.reshape(5, -1)[:, idx].T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_predicting_per_layer_equals_classifying_every_voxel():
    torch.manual_seed(1)
    size = (12, 10, 9)
    maps = {"a": torch.randn(3, 6, 5, 5), "b": torch.randn(4, 3, 3, 3)}
    feats = DenseFeatures(maps, {"a": 2, "b": 4}, size, torch.zeros(size, dtype=torch.long))
    W, b = torch.randn(3, 7), torch.randn(3)
    mean, std = torch.randn(7), torch.rand(7) + 0.5
    pred = predict_volume(feats, (W, b, mean, std))
    full = torch.cat([upsample_to_voxels(maps["a"][None], size, 2)[0], upsample_to_voxels(maps["b"][None], size, 4)[0]])  # fmt: skip
    x = full.reshape(7, -1).T
    want = (((x - mean) / std) @ W.T + b).argmax(1).reshape(size)
    assert (pred == want).float().mean() > 0.999  # ties aside


def test_linear_probe_learns_a_separable_rule_and_honours_weights():
    torch.manual_seed(0)
    x = torch.randn(600, 4)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    W, b, mean, std = fit_linear_probe(x, y, n_classes=2)
    pred = (((x - mean) / std) @ W.T + b).argmax(1)
    assert (pred == y).float().mean() > 0.97
    # all the weight on class-0 samples: the probe predicts class 0 everywhere it can
    w = (y == 0).float() + 1e-6
    W, b, mean, std = fit_linear_probe(x, y, n_classes=2, weights=w)
    pred = (((x - mean) / std) @ W.T + b).argmax(1)
    assert (pred == 0).float().mean() > 0.8


def test_whole_volume_features_match_the_encoder_and_the_real_strides():
    torch.manual_seed(0)
    net = build_encoder("resnet10", 3).eval()
    image = torch.rand(1, 37, 30, 26)
    maps, strides = volume_features(net, image)
    assert strides == {"layer1": 4, "layer2": 8, "layer3": 16}
    assert maps["layer1"].shape[1:] == (10, 8, 7) and maps["layer3"].shape[1:] == (3, 2, 2)


def test_pairs_from_a_folder_and_from_a_csv(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "nn" / sub).mkdir(parents=True)
    for case in ("case_001", "case_002"):
        (tmp_path / "nn" / "imagesTr" / f"{case}_0000.nii.gz").touch()
        (tmp_path / "nn" / "labelsTr" / f"{case}.nii.gz").touch()
    pairs = segmentation_pairs(tmp_path / "nn")
    assert [p[1].split("/")[-1] for p in pairs] == ["case_001.nii.gz", "case_002.nii.gz"]
    (tmp_path / "nn" / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DataError, match="no label map for .*case_002_0000"):
        segmentation_pairs(tmp_path / "nn")
    table = tmp_path / "list.csv"
    table.write_text("path,label\na.nii.gz,1\n")
    with pytest.raises(DataError, match="segmentation"):
        segmentation_pairs(table)
    with pytest.raises(DataError, match="neither a CSV"):
        segmentation_pairs(tmp_path / "missing")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_demo_dataset(root, n=5, shape=(40, 40, 32), spacing=(8.0, 8.0, 10.0), seed=3)
    return root


def test_label_maps_get_the_images_geometry(labelled):
    from byol3d.transforms import build_eval_transform

    enc = load_encoder(write_run_dir(labelled.parent / "geom_run"))
    row = next(csv.DictReader(open(labelled / "classes.csv")))
    with_label = build_eval_transform(enc.config, label_key="label")(
        {"image": str(labelled / row["path"]), "label": str(labelled / row["segmentation"])}
    )
    alone = enc.preprocess({"image": str(labelled / row["path"])})
    torch.testing.assert_close(with_label["image"].as_tensor(), alone["image"].as_tensor())
    lab = with_label["label"]
    assert lab.dtype == torch.int64 and lab.shape == alone["image"].shape
    # organs (lungs included, about -850 HU) lie in the body: above -900 HU where label > 0
    body = alone["image"].as_tensor() > 0.05
    assert (lab > 0).any() and bool(body[lab > 0].float().mean() > 0.95)


def write_run_dir(folder):
    write_run(folder, "resnet10", seed=0)
    return folder


def test_pretrained_equal_to_random_init_zero_differs_by_exactly_zero(labelled, tmp_path):
    # write_run's encoder is built after manual_seed(0) with config seed 0: it IS random init 0,
    # so with one random init every paired difference must be 0 (same labelled volumes, same net)
    run = write_run_dir(tmp_path / "run")
    report = dense_probe_run(run, labelled, labelled=(1, 2), seeds=2, random_inits=1, test=2,
                             voxels_per_class=200, progress=False)  # fmt: skip
    for n in ("1", "2"):
        s = report["summary"]["pretrained"][n]
        assert s["mean_difference"] == pytest.approx(0.0, abs=1e-9)
        assert 0.0 <= s["mean_a"] <= 1.0
    saved = json.loads((run / "dense_probe" / "dense_probe.json").read_text())
    assert saved["n_classes"] == 8 and len(saved["test"]) == 2
    rows = list(csv.DictReader(open(run / "dense_probe" / "dense_probe.csv")))
    assert {r["encoder"] for r in rows} == {"pretrained", "random_0"} and len(rows) == 8
    assert "| pretrained | 1 |" in (run / "dense_probe" / "dense_probe.md").read_text()


def test_too_few_volumes_for_the_split_is_one_clear_error(labelled, tmp_path):
    with pytest.raises(DataError, match="cannot give 4 test volumes and 3 training"):
        dense_probe_run(write_run_dir(tmp_path / "run"), labelled, labelled=(3,), test=4, progress=False)  # fmt: skip


def test_cli_evaluate_segmentation_prints_the_paired_table(labelled, tmp_path, capsys):
    from byol3d.cli import main

    run = write_run_dir(tmp_path / "run")
    code = main(["evaluate", str(run), "--segmentation", str(labelled), "--labelled", "1",
                 "--seeds", "2", "--random-inits", "1", "--test", "2", "--voxels-per-class", "100"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "| pretrained | 1 |" in out and "+0.000 [" in out
    assert (run / "dense_probe" / "dense_probe.json").exists()


def test_cli_evaluate_without_labels_is_one_clear_error(tmp_path, capsys):
    from byol3d.cli import main

    assert main(["evaluate", str(write_run_dir(tmp_path / "run"))]) != 0
    assert "--segmentation" in capsys.readouterr().err


def test_other_encoders_are_paired_against_the_first_on_the_same_sets(labelled, tmp_path):
    run = write_run_dir(tmp_path / "run")
    other = tmp_path / "other"
    write_run(other, "resnet10", seed=1)
    report = dense_probe_run(run, labelled, labelled=(1,), seeds=2, random_inits=1, test=2,
                             voxels_per_class=100, progress=False,
                             others={"same": run, "seed1": other})  # fmt: skip
    assert report["between"]["same - pretrained"]["1"]["mean_difference"] == 0.0
    by = {(r["encoder"], r["seed"]): r["mean_dice"] for r in report["records"]}
    want = np.mean([by[("seed1", s)] - by[("pretrained", s)] for s in range(2)])
    assert report["between"]["seed1 - pretrained"]["1"]["mean_difference"] == pytest.approx(want)
    assert want != 0.0
    assert "| seed1 - pretrained | " in format_dense_report(report)


def test_frame_label_maps_follow_the_frames_resize_and_bad_maps_are_named(tmp_path):
    from PIL import Image

    from byol3d.data.synthetic_frames import endoscopy_frame
    from byol3d.transforms.frames import LoadFrameLabelMapd

    frame, mask = endoscopy_frame(size=(96, 80), label=1, seed=0, with_mask=True)
    Image.fromarray(mask).save(tmp_path / "m.png")
    image = torch.zeros(3, 48, 40)  # the frame after ShortSideResized to 40: (C, W, H)
    out = LoadFrameLabelMapd("label", frame_size=40)({"image": image, "label": tmp_path / "m.png"})
    # nearest-exact at factor 2 reads pixel 2i+1; (H, W) PNG -> (W, H) like the frames
    assert torch.equal(out["label"][0], torch.as_tensor(mask[1::2, 1::2].T, dtype=torch.int64))
    with pytest.raises(DataError, match="m.png.*96x80 pixels.*does not match"):
        LoadFrameLabelMapd("label")({"image": image, "label": tmp_path / "m.png"})
    Image.fromarray(frame).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png' is a RGB image"):
        LoadFrameLabelMapd("label")({"image": image, "label": tmp_path / "rgb.png"})


def test_dense_probe_of_a_2d_run_on_frame_label_maps(tmp_path):
    from byol3d.data.synthetic_frames import write_endoscopy_dataset

    write_endoscopy_dataset(tmp_path / "frames", n=9, videos=3, size=(48, 40), seed=0)
    run = tmp_path / "run"
    write_run(run, "resnet10", spatial_dims=2, in_channels=3)
    report = dense_probe_run(run, tmp_path / "frames" / "frames.csv", labelled=(2,), seeds=2,
                             random_inits=1, test=3, voxels_per_class=50, progress=False)  # fmt: skip
    assert report["n_classes"] == 3  # background, instrument, blood
    # the test set is the last video folder's frames (sorted by path)
    assert all("video_02" in t for t in report["test"])
    s = report["summary"]["pretrained"]["2"]
    assert s["mean_difference"] == pytest.approx(0.0, abs=1e-9) and 0.0 <= s["mean_a"] <= 1.0
