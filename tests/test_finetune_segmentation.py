from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from byol3d.data.synthetic_ct import write_demo_dataset
from tests.evaluation.test_export import write_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "finetune_segmentation.py"


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_segmentation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dice_per_label_counts_overlap_exactly():
    import torch

    seg = load_script()
    truth = torch.tensor([0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    dice = seg.dice_per_label(pred, truth, n_labels=4)
    # label 1: 2*2/(2+3); label 2: 2*1/(2+2); label 3 absent from both -> nan
    assert dice[0] == pytest.approx(0.8) and dice[1] == pytest.approx(0.5)
    assert dice[2] != dice[2]


def test_pretrained_encoder_gets_its_own_learning_rate_and_warm_up():
    import argparse

    import torch
    from monai.networks.nets import FlexibleUNet

    seg = load_script()
    net = FlexibleUNet(1, 3, backbone="resnet10", spatial_dims=3, decoder_channels=(8, 8, 8, 8, 8))
    args = argparse.Namespace(lr=1e-3, encoder_lr=0.1)
    enc, rest = seg.make_optimizer(net, True, args).param_groups
    assert enc["lr"] == pytest.approx(1e-4) and rest["lr"] == pytest.approx(1e-3)
    n_enc = sum(1 for _ in net.encoder.parameters())
    assert len(enc["params"]) == n_enc and len(enc["params"]) + len(rest["params"]) == len(list(net.parameters()))  # fmt: skip
    assert [g["lr"] for g in seg.make_optimizer(net, False, args).param_groups] == [1e-3, 1e-3]
    net.train()
    seg.set_encoder_frozen(net, True)
    assert not any(p.requires_grad for p in net.encoder.parameters()) and not net.encoder.training
    assert all(p.requires_grad for p in net.decoder.parameters()) and net.decoder.training
    before = [b.clone() for b in net.encoder.buffers()]
    net(torch.randn(2, 1, 32, 32, 32)).sum().backward()  # frozen: BatchNorm statistics kept
    assert all(torch.equal(a, b) for a, b in zip(before, net.encoder.buffers()))
    assert all(p.grad is None for p in net.encoder.parameters())
    seg.set_encoder_frozen(net, False)
    assert all(p.requires_grad for p in net.encoder.parameters()) and net.encoder.training


@pytest.mark.slow
def test_quick_protocol_writes_tables_and_plot(tmp_path):
    data = tmp_path / "data"
    write_demo_dataset(data, n=4, shape=(40, 40, 32), spacing=(8.0, 8.0, 10.0), seed=0)
    write_run(tmp_path / "run", "resnet10")
    out = tmp_path / "seg"
    seg = load_script()
    code = seg.main(["--data", str(data), "--run", f"byol={tmp_path / 'run'}", "--output", str(out),
                     "--quick", "--test", "1", "--infer-roi", "32"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["variant"], r["labelled"], r["seed"]) for r in rows] == [("scratch", "1", "0"), ("byol", "1", "0")]  # fmt: skip
    assert all(0.0 <= float(r["mean_dice"]) <= 1.0 for r in rows) and "liver" in rows[0]
    assert "| byol |" in (out / "summary.md").read_text()
    assert (out / "dice_vs_labelled.png").stat().st_size > 0


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    write_run(tmp_path / "run", "resnet10")
    seg = load_script()
    assert seg.main(["--data", str(tmp_path), "--run", f"a={tmp_path / 'run'}", "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "classes.csv" in capsys.readouterr().err
    assert seg.main(["--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "--run" in capsys.readouterr().err


def test_class_balanced_crops_centre_small_labels_as_often_as_large_ones():
    import torch

    seg = load_script()
    label = torch.zeros(1, 48, 48, 48, dtype=torch.long)
    label[:, 24:] = 1  # half the volume
    label[:, 2:4, 2:4, 2:4] = 2  # 8 voxels in a corner
    image = label.float() * 10  # image and label crops must stay aligned
    vols = [(image, label)]

    def share_with_small_label(balanced: bool) -> float:
        sampler = seg.CropSampler(vols, 16, n_labels=3, balanced=balanced, seed=0)
        x, y = sampler(400)
        assert x.shape == (400, 1, 16, 16, 16) and y.shape == (400, 1, 16, 16, 16)
        assert torch.equal(x, y.float() * 10)
        return float((y == 2).flatten(1).any(1).float().mean())

    # balanced: a third of the centres lie on label 2 (binomial sd 0.024 at n=400), and crops
    # centred on background near the corner add some. Uniform: the corner box [0, 4)^3 lies in a
    # crop only if every start is 0..3 of 33 possible: (4/33)^3 = 0.0018.
    assert share_with_small_label(True) > 0.28
    assert share_with_small_label(False) < 0.02
    a = seg.CropSampler(vols, 16, 3, True, seed=5)(8)[1]
    assert torch.equal(a, seg.CropSampler(vols, 16, 3, True, seed=5)(8)[1])
