from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import byol3d
from byol3d.cli import main
from byol3d.data.synthetic_ct import write_demo_dataset
from byol3d.errors import CheckpointError
from byol3d.evaluation.features import (
    extract_features,
    extract_to_folder,
    feature_maps,
    load_encoder,
)
from byol3d.transforms import build_transforms
from tests.evaluation.test_export import write_run


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_demo_dataset(root, n=6, shape=(40, 40, 32), spacing=(8.0, 8.0, 10.0), seed=0)
    return root


def test_load_encoder_keeps_the_run_settings(tmp_path):
    enc = write_run(tmp_path / "run", "resnet18", spatial_dims=2, in_channels=3)
    for source in (tmp_path / "run", tmp_path / "run" / "encoder.pt"):
        loaded = byol3d.load_encoder(source)
        assert (loaded.name, loaded.spatial_dims, loaded.in_channels, loaded.norm) == ("resnet18", 2, 3, "batch")  # fmt: skip
        assert loaded.roi_size == (32, 32) and loaded.hu_window == (-1000.0, 1000.0)
        assert loaded.pixdim is None and loaded.crop_foreground and loaded.foreground_hu == -500.0
        assert not loaded.encoder.training
        assert torch.equal(loaded.encoder.conv1.weight, enc.conv1.weight)


def test_bare_encoder_without_config_is_refused(tmp_path):
    torch.save(byol3d.build_encoder("resnet10", 3).state_dict(), tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="no config.*config.yaml"):
        load_encoder(tmp_path / "encoder.pt")


def test_encoder_of_another_depth_than_its_config_names_both(tmp_path):
    write_run(tmp_path / "run", "resnet10")
    torch.save(byol3d.build_encoder("resnet18", 3).state_dict(), tmp_path / "run" / "encoder.pt")
    with pytest.raises(CheckpointError, match="resnet18 .*resnet10"):
        load_encoder(tmp_path / "run")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_crop_embedding_is_the_encoders_avgpool_output(tmp_path, spatial_dims):
    write_run(tmp_path / "run", "resnet10", spatial_dims=spatial_dims)
    enc = load_encoder(tmp_path / "run")
    x = torch.rand(1, *([32] * spatial_dims))
    feats = extract_features(enc, [x])
    assert feats.shape == (1, 512) and feats.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_allclose(feats[0], enc(x[None])[0].numpy(), rtol=1e-5, atol=1e-6)
    multi = extract_features(enc, x[None], layers=("layer1", "layer2", "layer3", "layer4"))
    assert multi.shape == (1, 64 + 128 + 256 + 512)
    np.testing.assert_allclose(multi[0, -512:], feats[0], rtol=1e-5, atol=1e-6)


def test_large_volume_goes_through_sliding_windows():
    net = byol3d.build_encoder("resnet10", 3).eval()
    x = torch.rand(1, 70, 40, 33)
    maps = feature_maps(net, x, roi_size=(32, 32, 32), overlap=0.25)
    # the windows' maps are stitched at each layer's stride: spatial // 4 for layer1
    assert maps["layer1"].shape == (64, 17, 10, 8) and maps["layer4"].shape[0] == 512
    feats = extract_features(net, [x], roi_size=(32, 32, 32))
    np.testing.assert_allclose(feats[0], maps["layer4"].flatten(1).mean(1).numpy(), rtol=1e-5)
    assert net.training is False
    with pytest.raises(ValueError, match="invalid layers"):
        feature_maps(net, x, layers=("fc",), roi_size=(32, 32, 32))


def test_extract_writes_features_and_index_with_the_pretraining_preprocessing(phantoms, tmp_path, capsys):  # fmt: skip
    write_run(tmp_path / "run", "resnet10")
    code = main(["extract", str(tmp_path / "run"), "--csv", str(phantoms / "classes.csv"),
                 "--output", str(tmp_path / "out"), "--layers", "layer2,layer4"])  # fmt: skip
    assert code == 0 and "6 x 512 features" in capsys.readouterr().out
    feats = np.load(tmp_path / "out" / "features.npy")
    assert feats.shape == (6, 512) and feats.dtype == np.float32
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv")))
    assert [r["label"] for r in rows] == ["0", "1", "2", "0", "1", "2"]
    assert rows[3]["path"].endswith("ct_003.nii.gz") and rows[3]["id"] == "ct_003"
    enc = load_encoder(tmp_path / "run")
    pre = build_transforms(enc.config)[0]
    expected = extract_features(enc, [pre({"image": rows[3]["path"]})["image"]])
    np.testing.assert_allclose(feats[3], expected[0], rtol=1e-5)
    maps = np.load(tmp_path / "out" / "maps" / "000003.npz")
    assert sorted(maps.files) == ["layer2", "layer4"] and maps["layer2"].shape[0] == 128

    extract_to_folder(tmp_path / "run", tmp_path / "out2", data=phantoms / "images", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "out2" / "features.npy"), feats, rtol=1e-5)


def test_extract_without_input_or_with_a_bad_layer_is_an_error(phantoms, tmp_path, capsys):
    write_run(tmp_path / "run", "resnet10")
    code = main(["extract", str(tmp_path / "run"), "--data", str(phantoms / "images"),
                 "--output", str(tmp_path / "o"), "--layers", "layer5"])  # fmt: skip
    assert code == 2 and "invalid layer 'layer5'" in capsys.readouterr().err


def test_the_runs_intensity_rule_reaches_load_encoder_extract_and_export(tmp_path):
    import json

    import nibabel as nib
    import yaml

    from byol3d.evaluation.export import export_encoder

    write_run(tmp_path / "run", "resnet10")
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    cfg["transforms"].update(intensity="zscore", foreground="nonzero", crop_foreground=False)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    enc = load_encoder(tmp_path / "run")
    assert (enc.intensity, enc.foreground) == ("zscore", "nonzero")
    assert enc.preprocessing["intensity"] == "zscore" and enc.preprocessing["in_channels"] == 1
    a = np.zeros((32, 32, 32), np.uint16)
    a[8:24, 8:24, 8:24] = np.arange(16**3).reshape(16, 16, 16) % 500 + 100
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "t1.nii.gz")
    x = enc.preprocess({"image": str(tmp_path / "t1.nii.gz")})["image"][0].numpy()
    fg = a > 0
    np.testing.assert_allclose(x[fg].mean(), 0.0, atol=1e-4)  # z-scored over the foreground
    np.testing.assert_allclose(x[fg].std(), 1.0, atol=1e-4)
    export_encoder(tmp_path / "run", tmp_path / "w.pt", to="flexible-unet")
    report = json.loads((tmp_path / "w.pt.json").read_text())["preprocessing"]
    assert (report["intensity"], report["foreground"], report["percentiles"]) == ("zscore", "nonzero", [0.5, 99.5])  # fmt: skip


def test_a_run_from_before_the_intensity_rule_is_a_ct_window_run(tmp_path):
    import yaml

    write_run(tmp_path / "run", "resnet10")
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for key in ("intensity", "percentiles", "foreground"):
        del cfg["transforms"][key]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    enc = load_encoder(tmp_path / "run")
    assert (enc.intensity, enc.foreground) == ("ct_window", "auto")
