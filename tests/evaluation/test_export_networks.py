"""Export to SwinUNETR, SegResNet and nnU-Net: every mismatch is one line naming both sides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import FlexibleUNet, SegResNet, SwinUNETR

import byol3d
from byol3d.cli import main
from byol3d.config import default_config, dump_config
from byol3d.errors import CheckpointError
from byol3d.evaluation.export import export_encoder, load_into
from byol3d.models.encoders import build_encoder

PLANS = Path(__file__).resolve().parents[2] / "configs" / "nnunet_resenc_example_plans.json"
SWIN = {"swin_feature_size": 12, "swin_depths": [1, 1, 1, 1]}
SEG = {"segresnet_blocks_down": [1, 1, 1]}


def write_run(folder, name, in_channels=1, **arch):
    """A run directory as pretrain leaves it: config.yaml + encoder.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    enc = build_encoder(name, 3, in_channels, **arch)
    cfg = default_config()
    cfg["model"].update(encoder=name, **arch)
    cfg["data"]["in_channels"] = in_channels
    cfg["transforms"]["roi_size"] = [32, 32, 32]
    (folder / "config.yaml").write_text(dump_config(cfg))
    torch.save(enc.state_dict(), folder / "encoder.pt")
    return enc


def one_line_naming(err, *parts):
    text = str(err.value)
    assert "\n" not in text
    for part in parts:
        assert part in text, (part, text)


def test_swin_weights_into_another_swin_or_channel_count_name_both(tmp_path):
    write_run(tmp_path / "run", "swin_unetr", **SWIN)
    wide = SwinUNETR(in_channels=1, out_channels=2, feature_size=24, depths=(1, 1, 1, 1))
    with pytest.raises(CheckpointError) as err:
        load_into(wide, tmp_path / "run")
    one_line_naming(err, "feature_size 12", "feature_size 24", "SwinUNETR.swinViT")
    two = SwinUNETR(in_channels=2, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))
    with pytest.raises(CheckpointError) as err:
        load_into(two, tmp_path / "run")
    one_line_naming(err, "1 channel)", "2 channels)")
    deep = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 1, 1, 1))
    with pytest.raises(CheckpointError) as err:
        load_into(deep, tmp_path / "run")
    one_line_naming(err, "depths [1, 1, 1, 1]", "depths [2, 1, 1, 1]")


def test_segresnet_weights_into_other_levels_or_a_renamed_key_fail(tmp_path):
    enc = write_run(tmp_path / "run", "segresnet", **SEG)
    other = SegResNet(init_filters=8, in_channels=1, out_channels=2)  # blocks_down (1, 2, 2, 4)
    with pytest.raises(CheckpointError) as err:
        load_into(other, tmp_path / "run")
    one_line_naming(err, "blocks_down [1, 1, 1]", "blocks_down [1, 2, 2, 4]")
    state = enc.state_dict()
    state["down_layers.1.1.conv1.conv.weight_renamed"] = state.pop(
        "down_layers.1.1.conv1.conv.weight"
    )
    torch.save(state, tmp_path / "renamed.pt")
    net = SegResNet(
        init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1), blocks_up=(1, 1)
    )
    with pytest.raises(CheckpointError) as err:
        load_into(net, tmp_path / "renamed.pt")
    one_line_naming(err, "unexpected key 'down_layers.1.1.conv1.conv.weight_renamed'",
                    "missing key 'down_layers.1.1.conv1.conv.weight'")  # fmt: skip


@pytest.mark.parametrize(
    "name, arch, to, parts",
    [
        (
            "resnet10",
            {},
            "swin-unetr",
            ("resnet10 (3D, 1 channel, batch norm)", "swin_unetr (feature_size 48"),
        ),
        ("segresnet", SEG, "swin-unetr", ("segresnet (init_filters 8", "swin_unetr")),
        ("swin_unetr", SWIN, "flexible-unet", ("swin_unetr (feature_size 12", "--to swin-unetr")),
    ],
)
def test_exporting_to_another_network_is_one_line_naming_both(
    tmp_path, capsys, name, arch, to, parts
):
    write_run(tmp_path / "run", name, **arch)
    code = main(["export", str(tmp_path / "run"), "--to", to, "--output", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("byol3d: error:")
    for part in parts:
        assert part in err, (part, err)
    assert not (tmp_path / "x.pt").exists()


def test_load_into_refuses_a_network_without_an_encoder():
    with pytest.raises(CheckpointError, match="no encoder byol3d can load into"):
        load_into(torch.nn.Linear(2, 2), "whatever.pt")


def test_load_into_flexible_unet_is_load_into(tmp_path):
    enc = write_run(tmp_path / "run", "resnet10")
    unet = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3)
    report = byol3d.load_into(unet, tmp_path / "run")
    assert report.loaded == report.total == len(enc.state_dict())
    assert str(report) == str(byol3d.load_into_flexible_unet(unet, tmp_path / "run"))


def other_plans(tmp_path, features):
    plans = json.loads(PLANS.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = (
        features
    )
    path = tmp_path / "other_plans.json"
    path.write_text(json.dumps(plans))
    return path


def test_nnunet_export_for_other_plans_names_both(tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    from byol3d.models.nnunet import build_nnunet_network, read_plans

    write_run(tmp_path / "run", "nnunet", nnunet_plans=str(PLANS))
    other = other_plans(tmp_path, [8, 16, 32, 32])
    with pytest.raises(CheckpointError) as err:
        export_encoder(tmp_path / "run", tmp_path / "x.pth", to="nnunet", plans=other)
    one_line_naming(err, "features [8, 16, 32, 64]", "features [8, 16, 32, 32]", "other_plans.json")
    assert not (tmp_path / "x.pth").exists()
    net = build_nnunet_network(read_plans(other), in_channels=1)
    with pytest.raises(CheckpointError) as err:
        load_into(net, tmp_path / "run")
    one_line_naming(err, "features [8, 16, 32, 64]", "features [8, 16, 32, 32]")
    two = build_nnunet_network(read_plans(PLANS), in_channels=2)
    with pytest.raises(CheckpointError) as err:
        load_into(two, tmp_path / "run")
    one_line_naming(err, "1 channel)", "2 channels)")


def test_nnunet_export_round_trips_through_load_into(tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    from byol3d.models.nnunet import build_nnunet_network, read_plans

    enc = write_run(tmp_path / "run", "nnunet", nnunet_plans=str(PLANS))
    export_encoder(tmp_path / "run", tmp_path / "x.pth", to="nnunet")
    sidecar = json.loads((tmp_path / "x.pth.json").read_text())
    assert sidecar["load"].startswith(
        "nnUNetv2_train DATASET 3d_fullres FOLD -p nnunet_resenc_example_plans"
    )
    net = build_nnunet_network(read_plans(PLANS), in_channels=1)
    report = load_into(net, tmp_path / "x.pth")  # the nnU-Net checkpoint itself
    assert report.loaded == report.total == len(enc.state_dict())
    for key, value in enc.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[key], value), key


@pytest.mark.parametrize(
    "name, arch, cls",
    [
        ("resnet10", {}, "FlexibleUNet"),
        ("segresnet", SEG, "SegResNet"),
        ("swin_unetr", SWIN, "SwinUNETR"),
        ("nnunet", {"nnunet_plans": str(PLANS)}, "NnUNetNetwork"),
    ],
)
def test_build_segmentation_net_is_the_runs_downstream_network(tmp_path, name, arch, cls):
    """What scripts/finetune_segmentation.py trains: the right class, byol3d-ordered logits of
    every voxel, and load_into fills every encoder tensor from the run."""
    if name == "nnunet":
        pytest.importorskip("dynamic_network_architectures")
    from byol3d.evaluation.export import build_segmentation_net, encoder_modules

    enc = write_run(tmp_path / "run", name, **arch)
    net = build_segmentation_net(byol3d.load_encoder(tmp_path / "run"), n_labels=3)
    assert type(net).__name__ == cls
    report = byol3d.load_into(net, tmp_path / "run")
    assert report.loaded == report.total == len(enc.state_dict())
    assert sum(len(m.state_dict()) for m in encoder_modules(net)) == len(enc.state_dict())
    shape = (32, 64, 32) if name in ("swin_unetr", "resnet10") else (32, 24, 16)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, *shape)).shape == (1, 3, *shape)
