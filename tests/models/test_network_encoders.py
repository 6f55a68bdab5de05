"""SwinUNETR's, SegResNet's and nnU-Net's encoders: the same modules as the networks, their
stages' strides, and where their feature cells sit (measured with input gradients, as
tests/models/test_dense_geometry.py does for the ResNet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SegResNet, SwinUNETR

from byol3d.models.byol import BYOL
from byol3d.models.correspondence import cells_to_view
from byol3d.models.encoders import HookedEncoder, build_encoder, layer_outputs
from byol3d.models.stages import encoder_stages

PLANS = Path(__file__).resolve().parents[2] / "configs" / "nnunet_resenc_example_plans.json"
SWIN = {"swin_feature_size": 12, "swin_depths": (1, 1, 1, 1)}


def test_swin_encoder_is_swinunetrs_swinvit_and_pools_its_deepest_tokens():
    torch.manual_seed(0)
    enc = build_encoder("swin_unetr", 3, 1, **SWIN).eval()
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1)).eval()
    net.swinViT.load_state_dict(enc.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        deepest = net.swinViT(x, normalize=False)[4]  # (1, 192, 2, 2, 2)
        rep = HookedEncoder(enc, "avgpool")(x)
    assert deepest.shape == (1, 16 * 12, 2, 2, 2)
    assert torch.allclose(rep, deepest.mean(dim=(2, 3, 4)), atol=1e-6)


def test_segresnet_encoder_is_segresnets_encode():
    torch.manual_seed(0)
    enc = build_encoder("segresnet", 3, 2, segresnet_init_filters=8).eval()
    net = SegResNet(init_filters=8, in_channels=2, out_channels=3).eval()
    missing, unexpected = net.load_state_dict(enc.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("up_", "conv_final")) for k in missing)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), net.encode(x)[0])


def plain_plans(tmp_path, strides=None):
    """The example plans as nnU-Net's PlainConvUNet (optionally other strides)."""
    plans = json.loads(PLANS.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    arch["arch_kwargs"]["n_conv_per_stage"] = arch["arch_kwargs"].pop("n_blocks_per_stage")
    if strides is not None:
        arch["arch_kwargs"]["strides"] = strides
    path = tmp_path / "plain_plans.json"
    path.write_text(json.dumps(plans))
    return path


def encoders(tmp_path):
    yield "swin_unetr", build_encoder("swin_unetr", 3, 1, **SWIN)
    yield "segresnet", build_encoder("segresnet", 3, 1)
    if pytest.importorskip("dynamic_network_architectures"):
        yield "nnunet", build_encoder("nnunet", 3, 1, nnunet_plans=str(PLANS))
        yield "nnunet-plain", build_encoder("nnunet", 3, 1, nnunet_plans=str(plain_plans(tmp_path)))


def test_every_stage_has_the_stride_the_stage_table_says(tmp_path):
    for name, enc in encoders(tmp_path):
        stages = {st.module: st for st in encoder_stages(enc.eval()).values()}
        with torch.no_grad():
            maps = layer_outputs(enc, torch.zeros(1, 1, 64, 64, 64), list(stages))
        for (module, st), fmap in zip(stages.items(), maps, strict=True):
            assert tuple(64 // s for s in st.stride) == tuple(fmap.shape[2:]), (name, module)
        layer2 = encoder_stages(enc)["layer2"]
        assert layer2.stride == (8, 8, 8), name


def test_nnunet_encoder_sees_volumes_in_nnunets_axis_order(tmp_path):
    """Strides (z, y, x) = (1, 2, 2) in the plans downsample byol3d's x and y, not z."""
    pytest.importorskip("dynamic_network_architectures")
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    enc = build_encoder("nnunet", 3, 1, nnunet_plans=str(plain_plans(tmp_path, strides))).eval()
    assert enc.stage_strides[1] == (2, 2, 1)
    with torch.no_grad():
        maps = layer_outputs(enc, torch.zeros(1, 1, 32, 24, 16), ["taps.1", "taps.3"])
    assert maps[0].shape[2:] == (16, 12, 16) and maps[1].shape[2:] == (4, 3, 4)


def gradient_centre(enc, size, module, spatial_dims=3):
    """The middle cell of ``module``'s map, and the centre of mass of |d cell / d input| per axis."""
    x = torch.randn(1, 1, *(size,) * spatial_dims, requires_grad=True)
    (fmap,) = layer_outputs(enc, x, [module])
    j = fmap.shape[2] // 2
    (grad,) = torch.autograd.grad(fmap[(0, slice(None), *(j,) * spatial_dims)].sum(), x)
    g = grad.abs()[0, 0].double()
    centre = [
        float(
            (g.sum(dim=tuple(b for b in range(spatial_dims) if b != a)) * torch.arange(size)).sum()
            / g.sum()
        )
        for a in range(spatial_dims)
    ]
    return j, tuple(fmap.shape[2:]), torch.tensor(centre), g


@pytest.mark.parametrize("name", ["segresnet", "nnunet-plain"])
def test_convolutional_cells_sit_where_view_to_cells_puts_them(tmp_path, name):
    """Padded stride-2 convolutions, as in the ResNet: cell j of stride s on voxel s * j (the
    centre of |grad| scatters by a few tenths of a voxel per random network: mean of 4)."""
    if name == "nnunet-plain":
        pytest.importorskip("dynamic_network_architectures")
    measured = torch.zeros(3, dtype=torch.float64)
    for seed in range(4):
        torch.manual_seed(seed)
        if name == "segresnet":
            enc, module = (
                build_encoder("segresnet", 3, 1, segresnet_blocks_down=(1, 1, 1, 1)),
                "down_layers.3",
            )
        else:
            enc, module = (
                build_encoder("nnunet", 3, 1, nnunet_plans=str(plain_plans(tmp_path))),
                "taps.3",
            )
        j, shape, centre, _ = gradient_centre(enc.eval(), 64, module)
        measured += centre.double() / 4
    mapped = cells_to_view(torch.full((1, 3), float(j)), (64,) * 3, shape)[0].double() * 64 - 0.5
    assert torch.allclose(mapped, torch.full((3,), 8.0 * j, dtype=torch.float64))
    assert (measured - mapped).abs().max() < 0.5, (name, measured.tolist(), mapped.tolist())
    patch = cells_to_view(torch.full((1, 3), float(j)), (64,) * 3, shape, cells="patch")
    assert (measured - (patch[0].double() * 64 - 0.5)).abs().min() > 3.0  # 3.5 voxels off


def test_swin_cells_are_their_patches():
    """With attention's output projection zeroed every Swin token depends on its own patch only:
    the gradient of cell j of stride s covers exactly voxels [s j, s (j + 1)), whose centre is
    where cells="patch" places the cell (s j + (s - 1) / 2), not s j."""
    torch.manual_seed(0)
    enc = build_encoder("swin_unetr", 3, 1, **SWIN).eval()
    with torch.no_grad():
        for m in enc.modules():
            if hasattr(m, "proj") and hasattr(m, "qkv"):
                m.proj.weight.zero_()
                m.proj.bias.zero_()
    for module, s in (("layers1.0", 4), ("layers2.0", 8)):
        j, shape, _, g = gradient_centre(enc, 64, module)
        support = g.sum(dim=(1, 2)).nonzero().flatten()
        assert support.tolist() == list(range(s * j, s * (j + 1))), module
        mapped = cells_to_view(torch.full((1, 3), float(j)), (64,) * 3, shape, cells="patch")
        assert torch.allclose(mapped[0] * 64 - 0.5, torch.full((3,), s * j + (s - 1) / 2))
    assert HookedEncoder(enc, "avgpool", "layer2").dense_cells == "patch"


def test_the_dense_term_refuses_nnunets_residual_encoder_and_says_why():
    pytest.importorskip("dynamic_network_architectures")
    enc = build_encoder("nnunet", 3, 1, nnunet_plans=str(PLANS))
    with pytest.raises(ValueError, match="average-pooled shortcut.*dense_weight 0"):
        BYOL(
            enc,
            (1, 32, 32, 32),
            hidden_dim=16,
            projection_dim=8,
            dense_weight=1.0,
            dense_layer="layer2",
        )
    with pytest.raises(
        ValueError, match="not a layer of the encoder; its layers are layer1, layer2"
    ):
        HookedEncoder(build_encoder("segresnet", 3, 1), "avgpool", "layer3")  # stride 16: none
