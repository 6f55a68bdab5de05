"""Pretrain each downstream network's encoder for a few steps, export it, load it back.

For SwinUNETR, SegResNet and nnU-Net's residual encoder (from the example plans that ship in
configs/): pretraining runs on phantoms, the export loads into the framework's own network
(nnU-Net: through nnU-Net's ``load_pretrained_weights``), and every encoder tensor of that
network then equals the one byol3d trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SegResNet, SwinUNETR

import byol3d
from byol3d.evaluation.export import export_encoder
from byol3d.training.pretrain import pretrain
from tests.training.test_pretrain import tiny_config, weights

PLANS = Path(__file__).resolve().parents[2] / "configs" / "nnunet_resenc_example_plans.json"

SWIN = ["model.encoder=swin_unetr", "model.swin_feature_size=12", "model.swin_depths=[1,1,1,1]"]
SEGRESNET = ["model.encoder=segresnet", "model.segresnet_blocks_down=[1,1,1]"]
NNUNET = ["model.encoder=nnunet", f"model.nnunet_plans={PLANS}"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from byol3d.data.synthetic_ct import write_demo_dataset

    root = tmp_path_factory.mktemp("phantoms")
    write_demo_dataset(root, n=4, shape=(40, 40, 32), spacing=(8.0, 8.0, 10.0), seed=0)
    return root / "images"


def run(phantoms, out, *extra):
    result = pretrain(tiny_config(phantoms, out, "train.max_epochs=2", *extra))
    losses = [float(r.split(",")[2]) for r in result.metrics_path.read_text().splitlines()[1:]]
    assert result.iterations >= 2 and losses and all(math.isfinite(v) for v in losses)
    return weights(result.encoder_path)


def assert_same(encoder_state, loaded_state):
    assert set(encoder_state) == set(loaded_state)
    for key, value in encoder_state.items():
        assert torch.equal(loaded_state[key], value), key


def test_swin_unetr_pretrains_with_the_dense_term_and_loads_into_swinunetr(phantoms, tmp_path):
    state = run(
        phantoms, tmp_path / "run", *SWIN, "model.dense_weight=1.0", "model.dense_layer=layer2"
    )
    report = export_encoder(tmp_path / "run", tmp_path / "swin.pt", to="swin-unetr")
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    net.swinViT.load_state_dict(torch.load(tmp_path / "swin.pt", weights_only=True), strict=True)
    assert report.loaded == report.total == len(state)
    assert_same(state, net.swinViT.state_dict())
    fresh = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    assert byol3d.load_into(fresh, tmp_path / "run").loaded == len(state)
    assert_same(state, fresh.swinViT.state_dict())


def test_segresnet_pretrains_with_the_dense_term_and_loads_into_segresnet(phantoms, tmp_path):
    state = run(
        phantoms, tmp_path / "run", *SEGRESNET, "model.dense_weight=1.0", "model.dense_layer=layer1"
    )
    export_encoder(tmp_path / "run", tmp_path / "seg.pt", to="segresnet")
    net = SegResNet(
        init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1, 1), blocks_up=(1, 1)
    )
    decoder = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("up_")}
    missing, unexpected = net.load_state_dict(
        torch.load(tmp_path / "seg.pt", weights_only=True), strict=False
    )
    assert unexpected == [] and all(k.startswith(("up_", "conv_final")) for k in missing)
    encoder = {
        k: v for k, v in net.state_dict().items() if k.startswith(("convInit.", "down_layers."))
    }
    assert_same(state, encoder)
    report = byol3d.load_into(net, tmp_path / "run")
    assert report.loaded == report.total == len(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in decoder.items())  # decoder untouched


def test_nnunet_resenc_pretrains_and_loads_through_nnunets_own_function(phantoms, tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    pytest.importorskip("nnunetv2")
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    state = run(phantoms, tmp_path / "run", *NNUNET)
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "-958.0" in cfg and "1096.0" in cfg  # hu_window from the plans' CT percentiles
    out = tmp_path / "nnunet.pth"
    report = export_encoder(tmp_path / "run", out, to="nnunet")
    assert report.loaded == report.total == len(state)
    arch = json.loads(PLANS.read_text())["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(123)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                 arch["_kw_requires_import"], 1, 5, deep_supervision=True)  # fmt: skip
    decoder_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("decoder.")
                      and not k.startswith("decoder.encoder.")}  # fmt: skip
    load_pretrained_weights(net, str(out))
    assert_same(state, net.encoder.state_dict())
    # the decoder came from the file (nnU-Net transfers every key but the seg_layers)
    file = torch.load(out, weights_only=False)["network_weights"]
    for key in decoder_before:
        expected = decoder_before[key] if ".seg_layers." in key else file[key]
        assert torch.equal(net.state_dict()[key], expected), key
