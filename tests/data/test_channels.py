"""Multi-sequence subjects (T1, T2, FLAIR as channels), written as real NIfTI files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import FlexibleUNet

from byol3d.config import load_config
from byol3d.data.channels import StackChannelsd
from byol3d.data.discovery import list_images, read_image_list
from byol3d.errors import ConfigError, DataError
from byol3d.transforms import build_eval_transform

CHANNELS = ["t1", "t2", "flair"]


def _subject(folder, seed=0, shape=(24, 24, 20), affines=None, suffix=".nii.gz"):
    """Three co-registered uint16 sequences of one subject: ``<id>_<channel>.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, name in enumerate(CHANNELS):
        a = np.zeros(shape, np.uint16)
        a[4:20, 4:20, 3:17] = rng.normal(500 * (i + 1), 50, size=(16, 16, 14)).round()
        affine = (affines or {}).get(name, np.diag([1.0, 1.0, 1.2, 1.0]))
        nib.save(nib.Nifti1Image(a, affine), folder / f"{folder.name}_{name}{suffix}")
        arrays[name] = a
    return arrays


def test_subject_folders_become_one_image_with_a_channel_per_sequence(tmp_path):
    arrays = _subject(tmp_path / "data" / "sub01")
    _subject(tmp_path / "data" / "sub02", seed=1)
    (tmp_path / "data" / "sub02" / "sub02_t1ce.nii.gz").write_bytes(b"")  # not t1: '*t1.*'
    subjects = list_images(tmp_path / "data", channels=CHANNELS)
    assert [[p.rsplit("/", 1)[1] for p in s] for s in subjects] == [
        ["sub01_t1.nii.gz", "sub01_t2.nii.gz", "sub01_flair.nii.gz"],
        ["sub02_t1.nii.gz", "sub02_t2.nii.gz", "sub02_flair.nii.gz"],
    ]
    out = StackChannelsd("image", names=CHANNELS)({"image": subjects[0]})["image"]
    assert tuple(out.shape) == (3, 24, 24, 20)
    for i, name in enumerate(CHANNELS):  # values and channel order as in the files
        np.testing.assert_array_equal(out[i].numpy(), arrays[name].astype(np.float32))
    np.testing.assert_allclose(out.affine.numpy(), np.diag([1.0, 1.0, 1.2, 1.0]))


def test_csv_with_a_column_per_channel(tmp_path):
    _subject(tmp_path / "sub01")
    (tmp_path / "list.csv").write_text(
        "id,t1,t2,flair,label\ns1,sub01/sub01_t1.nii.gz,sub01/sub01_t2.nii.gz,sub01/sub01_flair.nii.gz,a\n"
    )
    rows = read_image_list(tmp_path / "list.csv", channels=CHANNELS)
    assert rows[0]["id"] == "s1" and rows[0]["label"] == "a"
    assert [p.rsplit("_", 1)[1] for p in rows[0]["image"]] == ["t1.nii.gz", "t2.nii.gz", "flair.nii.gz"]  # fmt: skip
    with pytest.raises(DataError, match=r"list\.csv needs a column per channel .*missing \['t1ce'\]"):  # fmt: skip
        read_image_list(tmp_path / "list.csv", channels=["t1ce", "t2"])


def test_a_subject_missing_a_channel_is_named(tmp_path):
    _subject(tmp_path / "data" / "sub01")
    (tmp_path / "data" / "sub01" / "sub01_flair.nii.gz").unlink()
    with pytest.raises(DataError, match=r"subject .*sub01: no file for channel 'flair' \(pattern '\*flair\.\*'\)"):  # fmt: skip
        list_images(tmp_path / "data", channels=CHANNELS)


def test_channels_on_different_grids_are_one_line_naming_the_subject_and_both_grids(tmp_path):
    shifted = np.diag([1.0, 1.0, 1.2, 1.0])
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    _subject(tmp_path / "sub01", affines={"t2": shifted})
    subject = list_images(tmp_path, channels=CHANNELS)[0]
    with pytest.raises(DataError) as info:
        StackChannelsd("image", names=CHANNELS)({"image": subject})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"subject {tmp_path / 'sub01'}: 't2' (")
    assert "origin (5, 0, 0)" in message and "origin (0, 0, 0)" in message
    assert "data.resample_channels: true" in message
    # resampled onto t1's grid instead: t2 moved 5 voxels along x
    out = StackChannelsd("image", names=CHANNELS, resample=True)({"image": subject})["image"]
    t2 = nib.load(subject[1]).get_fdata()
    np.testing.assert_allclose(out[1, 9:20].numpy(), t2[4:15], atol=1e-3)
    assert float(out[1, :5].abs().max()) == 0.0  # outside t2's field of view: zeros


def test_in_channels_follows_from_the_channel_list():
    cfg = load_config(None, ["data.channels=[t1,t2,flair]"])
    assert cfg["data"]["in_channels"] == 3
    with pytest.raises(ConfigError, match="data.in_channels"):
        load_config(None, ["data.channels=[t1,t2,flair]", "data.in_channels=2"])
    with pytest.raises(ConfigError, match="data.channels"):
        load_config(None, ["data.channels=[t1,t1]"])


def test_multi_sequence_run_pretrains_exports_and_extracts(tmp_path):
    from byol3d.evaluation.export import export_encoder
    from byol3d.evaluation.features import extract_to_folder
    from byol3d.training.pretrain import pretrain
    from tests.training.test_pretrain import TINY

    for i in range(3):
        _subject(tmp_path / "data" / f"sub{i:02d}", seed=i, shape=(36, 36, 34))
    cfg = load_config(
        "configs/mr_resnet50.yaml",
        [*TINY, f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}",
         "data.channels=[t1,t2,flair]", "data.val_fraction=0", "train.max_epochs=1"],
    )  # fmt: skip
    result = pretrain(cfg)
    state = torch.load(result.encoder_path, weights_only=True)
    assert state["conv1.weight"].shape[1] == 3
    FlexibleUNet(in_channels=3, out_channels=2, backbone="resnet10", spatial_dims=3).encoder.load_state_dict(state, strict=True)  # fmt: skip
    export_encoder(tmp_path / "run", tmp_path / "w.pt", to="flexible-unet")
    features, index = extract_to_folder(tmp_path / "run", tmp_path / "feats", data=tmp_path / "data", progress=False)  # fmt: skip
    assert np.load(features).shape == (3, 512)
    assert "sub00_t1.nii.gz;" in index.read_text()
    x = build_eval_transform(cfg)({"image": list_images(tmp_path / "data", channels=CHANNELS)[0]})["image"]  # fmt: skip
    assert x.shape[0] == 3
    for c in range(3):  # each sequence z-scored on its own
        assert abs(float(x[c][x[c] > x[c].min()].mean())) < 0.5
