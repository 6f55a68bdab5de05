from __future__ import annotations

import pytest
import torch
from monai.networks import nets
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.resnet import resnet_params

from byol3d.cli import main
from byol3d.config import default_config, dump_config
from byol3d.errors import CheckpointError
from byol3d.evaluation.export import (
    export_encoder,
    infer_architecture,
    load_into_flexible_unet,
    strip_prefixes,
)
from byol3d.models.encoders import build_encoder


def write_run(folder, name="resnet10", spatial_dims=3, in_channels=1, norm="batch", seed=0):
    """A run directory as pretrain leaves it: config.yaml + encoder.pt (a bare state_dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    enc = build_encoder(name, spatial_dims, in_channels, norm)
    cfg = default_config()
    cfg["model"].update(encoder=name, norm=norm)
    cfg["data"].update(spatial_dims=spatial_dims, in_channels=in_channels)
    cfg["transforms"]["roi_size"] = [32] * spatial_dims
    cfg["seed"] = seed
    (folder / "config.yaml").write_text(dump_config(cfg))
    torch.save(enc.state_dict(), folder / "encoder.pt")
    return enc


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "name",
    [
        "resnet10",
        "resnet18",
        "resnet34",
        "resnet50",
        pytest.param("resnet101", marks=pytest.mark.slow),
    ],
)
def test_export_loads_strictly_into_flexible_unet_and_monai_resnet(tmp_path, name, spatial_dims):
    enc = write_run(tmp_path / "run", name, spatial_dims)
    out = tmp_path / "fu.pt"
    report = export_encoder(tmp_path / "run", out, to="flexible-unet")
    state = torch.load(out, weights_only=True)
    assert report.loaded == report.total == len(enc.state_dict()) == len(state)
    unet = FlexibleUNet(1, 3, backbone=name, spatial_dims=spatial_dims, pretrained=False)
    unet.encoder.load_state_dict(state, strict=True)
    assert torch.equal(unet.encoder.conv1.weight, enc.conv1.weight)

    export_encoder(tmp_path / "run", tmp_path / "rn.pt", to="resnet")
    _block, _layers, shortcut, bias_ds, _ = resnet_params[name]
    resnet = getattr(nets, name)(
        spatial_dims=spatial_dims, n_input_channels=1, conv1_t_stride=2,
        shortcut_type=shortcut, bias_downsample=bias_ds, feed_forward=False,
    )  # fmt: skip
    resnet.load_state_dict(torch.load(tmp_path / "rn.pt", weights_only=True), strict=True)


def test_load_into_flexible_unet_reports_every_key(tmp_path):
    enc = write_run(tmp_path / "run", "resnet18", 2, in_channels=3)
    unet = FlexibleUNet(3, 2, backbone="resnet18", spatial_dims=2)
    report = load_into_flexible_unet(unet, tmp_path / "run")
    assert report.loaded == report.total == len(enc.state_dict())
    assert report.architecture.name == "resnet18" and report.architecture.in_channels == 3
    assert "resnet18 (2D, 3 channels, batch norm)" in str(report)
    for key, value in enc.state_dict().items():
        assert torch.equal(unet.encoder.state_dict()[key], value)


def test_wrong_backbone_is_one_error_line_naming_both(tmp_path, capsys):
    write_run(tmp_path / "run", "resnet10")
    code = main(["export", str(tmp_path / "run"), "--to", "flexible-unet", "--backbone", "resnet18",
                 "--output", str(tmp_path / "x.pt")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("byol3d: error:")
    assert "resnet10" in err[0] and "resnet18" in err[0]
    assert not (tmp_path / "x.pt").exists()


def test_wrong_dims_into_flexible_unet_names_both(tmp_path):
    write_run(tmp_path / "run", "resnet10", spatial_dims=2)
    unet = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3)
    with pytest.raises(CheckpointError, match=r"resnet10 \(2D.*resnet10 \(3D"):
        load_into_flexible_unet(unet, tmp_path / "run")


def test_group_norm_run_is_refused_with_the_reason(tmp_path):
    write_run(tmp_path / "run", "resnet10", norm="group")
    unet = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3)
    with pytest.raises(CheckpointError, match="group/instance norm.*batch norm.*model.norm=batch"):
        load_into_flexible_unet(unet, tmp_path / "run")


def test_renamed_key_is_named(tmp_path):
    state = build_encoder("resnet10", 3).state_dict()
    state["layer1.0.conv1.weigth"] = state.pop("layer1.0.conv1.weight")
    torch.save(state, tmp_path / "enc.pt")
    unet = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3)
    with pytest.raises(CheckpointError, match=r"unexpected key 'layer1.0.conv1.weigth' and missing key 'layer1.0.conv1.weight'"):  # fmt: skip
        load_into_flexible_unet(unet, tmp_path / "enc.pt")
    before = unet.encoder.conv1.weight.clone()
    assert torch.equal(unet.encoder.conv1.weight, before)  # nothing loaded partially


def test_known_prefixes_are_stripped_and_unknown_ones_fail(tmp_path):
    enc = build_encoder("resnet10", 3)
    torch.save({f"module.encoder.{k}": v for k, v in enc.state_dict().items()}, tmp_path / "a.pt")
    unet = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3)
    assert load_into_flexible_unet(unet, tmp_path / "a.pt").loaded == len(enc.state_dict())
    torch.save({f"backbone.{k}": v for k, v in enc.state_dict().items()}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="no encoder byol3d knows.*'backbone.conv1.weight'"):
        load_into_flexible_unet(unet, tmp_path / "b.pt")
    assert list(strip_prefixes({"encoder.a": 1, "decoder.b": 2})) == ["encoder.a", "decoder.b"]


def test_training_checkpoint_gives_the_online_encoder(tmp_path):
    from byol3d.models.byol import BYOL

    torch.manual_seed(1)
    model = BYOL(
        build_encoder("resnet10", 3), input_shape=(1, 32, 32, 32), hidden_dim=16, projection_dim=8
    )
    with torch.no_grad():
        model.target_encoder.net.conv1.weight.add_(1.0)  # target differs from online
    cfg = default_config()
    cfg["model"]["encoder"] = "resnet10"
    torch.save({"model": model.state_dict(), "config": cfg}, tmp_path / "checkpoint_3.pt")
    unet = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3)
    load_into_flexible_unet(unet, tmp_path / "checkpoint_3.pt")
    assert torch.equal(unet.encoder.conv1.weight, model.online_encoder.net.conv1.weight)


def test_infer_architecture_reads_depth_dims_channels():
    arch = infer_architecture(build_encoder("resnet50", 2, 3).state_dict())
    assert (arch.name, arch.spatial_dims, arch.in_channels, arch.norm) == (
        "resnet50",
        2,
        3,
        "batch",
    )
    assert infer_architecture({"fc.weight": torch.zeros(2, 2)}) is None


def test_missing_run_and_bad_target_are_clear_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--to", "resnet", "--output", str(tmp_path / "o.pt")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no encoder.pt and no checkpoints"):
        export_encoder(tmp_path / "empty", tmp_path / "o.pt")
    write_run(tmp_path / "run")
    with pytest.raises(CheckpointError, match="invalid export target 'onnx'"):
        export_encoder(tmp_path / "run", tmp_path / "o.pt", to="onnx")
