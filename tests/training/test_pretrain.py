from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import FlexibleUNet

from byol3d.config import load_config
from byol3d.data.synthetic_ct import write_demo_dataset
from byol3d.errors import CheckpointError, ConfigError, DataError
from byol3d.models.encoders import build_encoder
from byol3d.rundir import latest_checkpoint
from byol3d.training.pretrain import pretrain

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = [
    "model.encoder=resnet10",
    "model.hidden_dim=32",
    "model.projection_dim=16",
    "transforms.roi_size=[32,32,32]",
    "transforms.pixdim=null",
    "train.batch_size=2",
    "train.max_epochs=1",
    "train.warmup_epochs=0",
    "train.lr=1e-3",
    "train.min_lr=0",
    "train.log_every=2",
    "train.checkpoint_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
    "data.cache=none",
    "data.num_workers=0",
    "data.val_fraction=0.2",
    "data.dicom=false",
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_demo_dataset(root, n=5, shape=(40, 40, 32), spacing=(8.0, 8.0, 10.0), seed=0)
    return root / "images"


def tiny_config(root, out, *extra):
    return load_config(None, [*TINY, f"data.root={root}", f"output_dir={out}", *extra])


def weights(model_file):
    return torch.load(model_file, map_location="cpu", weights_only=True)


def test_pretrain_writes_the_run_directory(phantoms, tmp_path):
    out = tmp_path / "run"
    result = pretrain(tiny_config(phantoms, out))
    assert (out / "config.yaml").is_file() and yaml.safe_load((out / "config.yaml").read_text())[
        "data"
    ]["root"] == str(phantoms)
    assert result.checkpoint == out / "checkpoints" / "checkpoint_1.pt"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == list(range(1, result.iterations + 1))
    assert result.iterations == 2  # 4 training volumes, batch 2
    assert all(float(r["collapse"]) > 0 for r in rows)
    epochs = list(csv.DictReader((out / "epochs.csv").open()))
    assert len(epochs) == 1 and float(epochs[0]["val_loss"]) >= 0
    # encoder.pt: a plain state_dict that build_encoder and FlexibleUNet load strictly
    state = weights(result.encoder_path)
    build_encoder("resnet10", spatial_dims=3, in_channels=1).load_state_dict(state, strict=True)
    unet = FlexibleUNet(in_channels=1, out_channels=3, backbone="resnet10", spatial_dims=3)
    unet.encoder.load_state_dict(state, strict=True)
    ckpt = weights(result.checkpoint)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "config"} <= set(ckpt)
    assert ckpt["config"]["model"]["encoder"] == "resnet10"
    assert torch.equal(state["conv1.weight"], ckpt["model"]["online_encoder.net.conv1.weight"])


@pytest.mark.parametrize("views", ["cpu", "batched"])
def test_resume_continues_from_checkpoint_and_matches_uninterrupted_run(phantoms, tmp_path, views):
    out = tmp_path / "run"
    extra = [f"transforms.views={views}", "model.dense_weight=1.0", "model.dense_layer=layer2"]
    extra = extra if views == "batched" else []  # batched: the dense term reads its records
    straight = pretrain(tiny_config(phantoms, out, "train.max_epochs=2", *extra))
    assert straight.iterations == 4
    final = weights(straight.checkpoint)
    # an interruption after epoch 1's checkpoint: the epoch-2 checkpoint never got written
    straight.checkpoint.unlink()
    resumed = pretrain(tiny_config(phantoms, out, "train.max_epochs=2", *extra))
    assert resumed.resumed_from == out / "checkpoints" / "checkpoint_1.pt"
    assert resumed.iterations == 4
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    again = weights(resumed.checkpoint)
    assert again["trainer"]["iteration"] == 4
    for part in ("model", "optimizer"):
        a, b = final[part], again[part]
        if part == "optimizer":
            a, b = a["state"], b["state"]
            a = {f"{k}.{n}": v for k, s in a.items() for n, v in s.items()}
            b = {f"{k}.{n}": v for k, s in b.items() for n, v in s.items()}
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), f"{part}: {key}"


@pytest.mark.parametrize("name", ["ct_resnet50.yaml", "mr_resnet50.yaml"])
def test_shipped_gpu_configs_train_from_their_store_with_batched_views(phantoms, tmp_path, name):
    """The configs for real scale use the store and batched views; that path runs as shipped."""
    out = tmp_path / "run"
    keep = [o for o in TINY if not o.startswith("data.cache")]  # the config's own cache and views
    cfg = load_config(CONFIGS / name, [*keep, f"data.root={phantoms}", f"output_dir={out}"])
    assert (cfg["data"]["cache"], cfg["transforms"]["views"]) == ("store", "batched")
    result = pretrain(cfg)
    assert result.iterations == 2  # 4 training phantoms, batch 2, one epoch
    assert len(list((out / "store" / "arrays").iterdir())) == 5  # both splits, written on first use
    with open(out / "metrics.csv") as f:
        assert all(math.isfinite(float(r["loss"])) for r in csv.DictReader(f))


@pytest.mark.parametrize("views", ["cpu", "batched"])
def test_training_from_the_store_resumes_exactly_and_writes_the_store_once(phantoms, tmp_path, views):  # fmt: skip
    out, store = tmp_path / "run", tmp_path / "store"
    cfg = tiny_config(phantoms, out, "train.max_epochs=2", "data.cache=store", f"data.cache_dir={store}",
                      f"transforms.views={views}")  # fmt: skip
    straight = pretrain(cfg)  # the store is written on first use
    assert straight.iterations == 4
    arrays = {p: p.stat().st_mtime_ns for p in (store / "arrays").iterdir()}
    assert len(arrays) == 5  # every phantom, both splits
    final = weights(straight.checkpoint)
    straight.checkpoint.unlink()  # interrupted after epoch 1's checkpoint
    resumed = pretrain(cfg)
    assert resumed.resumed_from == out / "checkpoints" / "checkpoint_1.pt"
    assert {p: p.stat().st_mtime_ns for p in (store / "arrays").iterdir()} == arrays
    again = weights(resumed.checkpoint)
    for key, value in final["model"].items():
        assert torch.equal(value, again["model"][key]), key


def test_raising_max_epochs_trains_on_from_the_checkpoint(phantoms, tmp_path):
    out = tmp_path / "run"
    first = pretrain(tiny_config(phantoms, out, "train.max_epochs=1"))
    second = pretrain(tiny_config(phantoms, out, "train.max_epochs=2"))
    assert first.iterations == 2 and second.iterations == 4
    assert second.resumed_from == out / "checkpoints" / "checkpoint_1.pt"
    assert latest_checkpoint(out).name == "checkpoint_2.pt"
    assert weights(out / "checkpoints" / "checkpoint_2.pt")["trainer"]["iteration"] == 4
    lrs = [float(r["lr"]) for r in csv.DictReader((out / "metrics.csv").open())]
    # run 1 decayed to min_lr 0 over 2 steps; the resumed run follows the 4-step schedule from step 3
    assert lrs[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 2)))
    assert lrs[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert lrs[3] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_keep_checkpoints_prunes_across_resumes(phantoms, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(phantoms, out, "train.keep_checkpoints=1"))
    pretrain(tiny_config(phantoms, out, "train.keep_checkpoints=1", "train.max_epochs=2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_2.pt"]


def test_finished_run_is_not_retrained(phantoms, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(phantoms, out))
    before = weights(out / "encoder.pt")
    again = pretrain(tiny_config(phantoms, out))
    assert again.iterations == 2 and again.resumed_from is not None
    after = weights(out / "encoder.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_changed_config_refuses_to_reuse_run_dir(phantoms, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(phantoms, out))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        pretrain(tiny_config(phantoms, out, "train.max_epochs=2", "train.lr=0.01"))
    result = pretrain(
        tiny_config(phantoms, out, "train.max_epochs=2", "train.lr=0.01"), allow_config_change=True
    )
    assert result.epochs == 2
    assert latest_checkpoint(out).name == "checkpoint_2.pt"
    assert (out / "checkpoints" / "checkpoint_1.pt").is_file()  # earlier checkpoints are kept


def test_truncated_checkpoint_is_a_clear_error(phantoms, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(phantoms, out))
    ckpt = latest_checkpoint(out)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="checkpoint_1.pt"):
        pretrain(tiny_config(phantoms, out, "train.max_epochs=2"))


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        pretrain(load_config(None, [*TINY, f"output_dir={tmp_path}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        pretrain(tiny_config(tmp_path / "empty", tmp_path / "run"))


@pytest.mark.parametrize(
    "override,match",
    [
        ("transforms.foreground_hu=-2000", "foreground_hu"),
        ("transforms.roi_size=[32,48,32]", "roi_size"),
        ("model.hidden_layer=layer5", "layer5"),
    ],
)
def test_inconsistent_settings_are_config_errors(phantoms, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        pretrain(tiny_config(phantoms, tmp_path / "run", override))


def test_sigkill_after_a_checkpoint_then_resume_gives_identical_weights(phantoms, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [f"{k}" for k in TINY if not k.startswith("train.max_epochs")] + [
        f"data.root={phantoms}",
        "train.max_epochs=6",
    ]
    cmd = [sys.executable, "-m", "byol3d", "pretrain", "configs/demo_ct.yaml", *args]
    straight = subprocess.run(
        [*cmd, f"output_dir={tmp_path / 'straight'}"], capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, f"output_dir={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (out / "checkpoints" / "checkpoint_1.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "checkpoint_6.pt").exists()  # killed before the end
    resumed = subprocess.run([*cmd, f"output_dir={out}"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = weights(tmp_path / "straight" / "checkpoints" / "checkpoint_6.pt")["model"]
    b = weights(out / "checkpoints" / "checkpoint_6.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        weights(out / "encoder.pt").keys() == weights(tmp_path / "straight" / "encoder.pt").keys()
    )


def test_tensorboard_gets_scalars_and_view_images_when_installed(phantoms, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    pretrain(
        tiny_config(phantoms, out, "train.tensorboard=true", "train.tensorboard_views_every=2")
    )
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/tau", "train/lr", "train/collapse"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert "views" in events.Tags()["images"]


def test_checkpoint_of_another_architecture_is_refused_by_name(phantoms, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(phantoms, out))
    with pytest.raises(ConfigError, match="model.encoder: 'resnet10' -> 'resnet18'"):
        pretrain(tiny_config(phantoms, out, "model.encoder=resnet18", "train.max_epochs=2"))
    with pytest.raises(CheckpointError, match="checkpoint_1.pt.*does not fit"):
        pretrain(
            tiny_config(phantoms, out, "model.encoder=resnet18", "train.max_epochs=2"),
            allow_config_change=True,
        )
    assert latest_checkpoint(out).name == "checkpoint_1.pt"  # nothing lost


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    from byol3d.rundir import load_checkpoint

    with pytest.raises(CheckpointError, match="nope.pt.*does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("cache", ["none", "store"])
def test_on_bad_file_skip_lists_bad_files_and_trains_on(phantoms, tmp_path, cache):
    import shutil

    import nibabel as nib
    import numpy as np

    root = tmp_path / "data"
    shutil.copytree(phantoms, root)
    nib.save(
        nib.Nifti1Image(np.full((40, 40, 32), np.nan, np.float32), np.eye(4)),
        str(root / "nan.nii.gz"),
    )
    (root / "truncated.nii.gz").write_bytes((root / "ct_000.nii.gz").read_bytes()[:300])
    with pytest.raises(DataError, match="nan.nii.gz|truncated.nii.gz"):
        pretrain(tiny_config(root, tmp_path / "strict", f"data.cache={cache}"))
    out = tmp_path / "run"
    result = pretrain(tiny_config(root, out, "data.on_bad_file=skip", f"data.cache={cache}"))
    assert result.iterations == 2  # the 5 good phantoms: 4 train, batch 2
    skipped = (out / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in skipped) == [
        "nan.nii.gz",
        "truncated.nii.gz",
    ]
    assert all("\t" in line and line.split("\t")[1] for line in skipped)


def test_pretrain_with_dense_term_logs_it_and_exports_the_same_encoder(phantoms, tmp_path):
    out = tmp_path / "dense"
    result = pretrain(
        tiny_config(phantoms, out, "model.dense_weight=1.0", "model.dense_layer=layer2")
    )
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == result.iterations == 2
    assert all(0 < float(r["dense"]) < float(r["loss"]) for r in rows)
    ckpt = weights(result.checkpoint)
    assert any(k.startswith("target_dense_projector.") for k in ckpt["model"])
    state = weights(result.encoder_path)  # only the encoder: the dense heads stay behind
    unet = FlexibleUNet(in_channels=1, out_channels=3, backbone="resnet10", spatial_dims=3)
    unet.encoder.load_state_dict(state, strict=True)
    epochs = list(csv.DictReader((out / "epochs.csv").open()))
    assert math.isfinite(float(epochs[0]["val_loss"]))


def test_checkpoint_from_before_the_dense_keys_resumes(phantoms, tmp_path):
    out = tmp_path / "old"
    pretrain(tiny_config(phantoms, out, "train.max_epochs=1"))
    path = out / "checkpoints" / "checkpoint_1.pt"
    ckpt = weights(path)
    for key in ("dense_weight", "dense_layer", "dense_grid"):  # as saved by an older byol3d
        del ckpt["config"]["model"][key]
    torch.save(ckpt, path)
    resumed = pretrain(tiny_config(phantoms, out, "train.max_epochs=2"))
    assert resumed.resumed_from == path and resumed.iterations == 4
    with pytest.raises(ConfigError, match="model.dense_weight: 0.0 -> 1.0"):
        pretrain(tiny_config(phantoms, out, "train.max_epochs=3", "model.dense_weight=1.0"))
