from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import FlexibleUNet
from torch import nn

from byol3d.models.encoders import HookedEncoder, build_encoder
from byol3d.models.heads import MLP


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"])
def test_encoder_state_dict_loads_strictly_into_flexible_unet(name, spatial_dims):
    enc = build_encoder(name, spatial_dims=spatial_dims, in_channels=1)
    unet = FlexibleUNet(
        in_channels=1, out_channels=2, backbone=name, spatial_dims=spatial_dims, pretrained=False
    )
    result = unet.encoder.load_state_dict(enc.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    key = "conv1.weight"
    assert torch.equal(unet.encoder.state_dict()[key], enc.state_dict()[key])


def test_encoder_matches_flexible_unet_configuration():
    enc = build_encoder("resnet50", spatial_dims=3)
    assert enc.conv1.stride == (2, 2, 2)
    assert enc.fc is None
    assert [n for n, _ in enc.named_children()] == [
        "conv1",
        "bn1",
        "act",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "avgpool",
    ]


@pytest.mark.parametrize("spatial_dims,channels,out", [(3, 1, 512), (2, 3, 512)])
def test_encoder_forward_ends_at_avgpool(spatial_dims, channels, out):
    enc = build_encoder("resnet18", spatial_dims=spatial_dims, in_channels=channels)
    x = torch.randn(2, channels, *([32] * spatial_dims))
    assert enc(x).shape == (2, out)


@pytest.mark.parametrize("norm,layer", [("group", nn.GroupNorm), ("instance", nn.InstanceNorm3d)])
def test_non_batch_norm_reaches_every_layer(norm, layer):
    enc = build_encoder("resnet18", norm=norm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    assert isinstance(enc.layer4[1].bn2, layer) and isinstance(enc.bn1, layer)
    # a batch of 1 trains without batch norm (instance norm needs > 1 voxel at layer4: 64^3 input)
    assert enc(torch.randn(1, 1, 64, 64, 64)).shape == (1, 512)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "resnet11"}, "resnet11"),
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"in_channels": 0}, "in_channels"),
        ({"norm": "layer"}, "norm"),
    ],
)
def test_build_encoder_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_encoder(**kwargs)


def test_hooked_encoder_pools_spatial_layer_and_removes_hooks():
    enc = build_encoder("resnet10", spatial_dims=3)
    hooked = HookedEncoder(enc, "layer4")
    x = torch.randn(2, 1, 32, 32, 32)
    out = hooked(x)
    # layer4 of resnet10 has 512 channels; the output is its global average
    feats = {}
    h = enc.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    enc(x)
    h.remove()
    torch.testing.assert_close(out, feats["x"].mean(dim=(2, 3, 4)))
    assert not enc.layer4._forward_hooks and not enc.avgpool._forward_hooks
    assert hooked.feature_dim((1, 32, 32, 32)) == 512


def test_hooked_encoder_avgpool_equals_encoder_output():
    enc = build_encoder("resnet10", spatial_dims=2, in_channels=3).eval()
    hooked = HookedEncoder(enc, "avgpool")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(hooked(x), enc(x))


def test_hooked_encoder_removes_hook_when_forward_fails():
    enc = build_encoder("resnet10", spatial_dims=3)
    hooked = HookedEncoder(enc, "avgpool")
    with pytest.raises(RuntimeError):
        hooked(torch.randn(2, 5, 32, 32, 32))  # wrong channel count
    assert not enc.avgpool._forward_hooks


def test_hooked_encoder_unknown_layer_lists_layers():
    with pytest.raises(ValueError, match="layer9.*layer4"):
        HookedEncoder(build_encoder("resnet10"), "layer9")


def test_hooked_encoder_layer_not_run_is_clear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    net = Net()
    with pytest.raises(RuntimeError, match="never called"):
        HookedEncoder(net, "unused")(torch.randn(2, 4))


def test_hooked_encoder_survives_deepcopy_and_has_no_duplicate_state():
    hooked = HookedEncoder(build_encoder("resnet10"), "layer3")
    clone = copy.deepcopy(hooked)
    assert set(hooked.state_dict()) == {f"net.{k}" for k in hooked.net.state_dict()}
    torch.testing.assert_close(
        clone.eval()(torch.ones(1, 1, 32, 32, 32)), hooked.eval()(torch.ones(1, 1, 32, 32, 32))
    )


def test_hooked_encoder_works_under_data_parallel():
    hooked = HookedEncoder(build_encoder("resnet10"), "avgpool")
    out = nn.DataParallel(hooked)(torch.randn(2, 1, 32, 32, 32))
    assert out.shape == (2, 512)


def test_feature_dim_rejects_input_the_encoder_cannot_take():
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        HookedEncoder(build_encoder("resnet10")).feature_dim((3, 32, 32, 32))


def test_mlp_is_the_paper_head():
    head = MLP(512, 64, 16)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].in_features == 512 and head[0].out_features == 64 and head[3].out_features == 16
    with pytest.raises(ValueError, match="hidden_dim"):
        MLP(512, 0, 16)


def test_resnet50_3d_costs_81_gflop_per_128_cube_volume():
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        enc = build_encoder("resnet50", spatial_dims=3).eval()
        x = torch.zeros(1, 1, 128, 128, 128)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        enc(x)
    assert counter.get_total_flops() / 1e9 == pytest.approx(81.07, abs=0.05)
