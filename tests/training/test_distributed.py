from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from byol3d.data.synthetic_ct import write_demo_dataset

TINY = [
    "model.encoder=resnet10", "model.hidden_dim=32", "model.projection_dim=16",
    "transforms.roi_size=[32,32,32]", "transforms.pixdim=null", "train.max_epochs=2",
    "train.warmup_epochs=0", "train.log_every=2", "train.progress=false", "train.tensorboard=false",
    "train.device=cpu", "data.cache=none", "data.num_workers=0", "data.val_fraction=0.12",
]  # fmt: skip


def run(args):
    return subprocess.run([sys.executable, "-m", "byol3d", "pretrain", "configs/demo_ct.yaml", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def losses(out):
    return [float(r["loss"]) for r in csv.DictReader((out / "metrics.csv").open())]


@pytest.mark.parametrize("views", ["cpu", pytest.param("batched", marks=pytest.mark.slow)])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, views):
    write_demo_dataset(tmp_path / "data", n=9, shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
    common = [*TINY, f"data.root={tmp_path / 'data' / 'images'}", f"transforms.views={views}"]
    ddp = run(
        [*common, "train.batch_size=2", f"output_dir={tmp_path / 'ddp'}", "--nproc-per-node", "2"]
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    # pretrain checks at the end that both ranks hold identical weights (online and target)
    single = run([*common, "train.batch_size=4", f"output_dir={tmp_path / 'single'}"])
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(a) == len(b) == 4  # 8 training volumes, global batch 4, 2 epochs
    # same initial weights and global batch size; the samples within the batch, their
    # augmentations and (without SyncBatchNorm on CPU) the batch-norm statistics differ
    assert sum(a) / len(a) == pytest.approx(sum(b) / len(b), rel=0.15)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "checkpoint_2.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["trainer"]["iteration"] == 4
    # one end-of-run summary, from rank 0 only, on stdout (not again on stderr)
    assert ddp.stdout.count("byol3d: run ") == 1 and ": 2 epochs, 4 iterations" in ddp.stdout
    assert "byol3d: run " not in ddp.stderr


def test_distributed_config_error_is_one_line(tmp_path):
    proc = run(
        [*TINY, f"data.root={tmp_path}", f"output_dir={tmp_path / 'run'}", "--nproc-per-node", "2"]
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("byol3d: error:")]
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_dense_term_trains_under_ddp_with_ranks_in_agreement(tmp_path):
    write_demo_dataset(tmp_path / "data", n=5, shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
    proc = run(
        [*TINY, f"data.root={tmp_path / 'data' / 'images'}", "train.batch_size=2",
         f"output_dir={tmp_path / 'run'}", "model.dense_weight=1.0", "model.dense_layer=layer2",
         "--nproc-per-node", "2"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]  # pretrain checks that the ranks agree
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert rows and all(float(r["dense"]) > 0 for r in rows)


@pytest.mark.slow  # about 2 minutes on 2 busy cores
def test_two_gloo_processes_train_from_one_store_written_by_rank_0(tmp_path):
    write_demo_dataset(tmp_path / "data", n=5, shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
    store = tmp_path / "store"
    proc = run(
        [*TINY, f"data.root={tmp_path / 'data' / 'images'}", "train.batch_size=2", "train.max_epochs=1",
         f"output_dir={tmp_path / 'run'}", "data.cache=store", f"data.cache_dir={store}",
         "--nproc-per-node", "2"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]  # pretrain checks that the ranks agree
    manifest = json.loads((store / "manifest.json").read_text())
    assert len(manifest["entries"]) == 5 and len(list((store / "arrays").iterdir())) == 5
    assert proc.stderr.count("preprocessing 5 volumes") == 1  # rank 0 wrote it; rank 1 only read
    assert len(losses(tmp_path / "run")) == 1  # 4 training volumes, global batch 4
