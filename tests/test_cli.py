from __future__ import annotations

import subprocess
import sys

from byol3d.cli import main


def test_unknown_key_is_one_error_line(tmp_path, capsys):
    code = main(["pretrain", "configs/demo_ct.yaml", "train.max_epoch=5", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        "byol3d: error: unknown config key 'train.max_epoch' in the command line (did you mean 'train.max_epochs'?)"
    ]


def test_empty_data_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "pretrain",
            "configs/demo_ct.yaml",
            f"data.root={tmp_path / 'empty'}",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("byol3d: error: ") and "empty" in err and "Traceback" not in err


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "byol3d", "pretrain", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("byol3d: error: cannot read config file")
        and "Traceback" not in proc.stderr
    )


def test_demo_data_writes_volumes(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "demo"), "--n", "3", "--shape", "32", "32", "24"]) == 0
    assert len(list((tmp_path / "demo" / "images").glob("*.nii.gz"))) == 3
    assert main(["demo-data", str(tmp_path / "demo"), "--n", "0"]) == 2


def test_options_may_sit_between_overrides(tmp_path, capsys):
    code = main(
        [
            "pretrain",
            "configs/demo_ct.yaml",
            "--quiet",
            "train.max_epoch=1",
            "--allow-config-change",
            "seed=1",
        ]
    )
    assert code == 2 and "train.max_epoch'" in capsys.readouterr().err


def test_error_from_a_dataloader_worker_is_one_line(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        vol = np.full((40, 40, 40), 100, dtype=np.float32)
        if i == 1:
            vol[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / f"ct_{i}.nii.gz"))
    code = main(
        [
            "pretrain",
            "configs/demo_ct.yaml",
            f"data.root={root}",
            f"output_dir={tmp_path / 'run'}",
            "data.cache=none",
            "data.num_workers=1",
            "data.val_fraction=0",
            "train.progress=false",
            "model.hidden_dim=16",
            "model.projection_dim=8",
            "transforms.roi_size=[32,32,32]",
            "transforms.pixdim=null",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("byol3d: error: ") and "ct_1.nii.gz" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_run_without_validation_prints_no_val_loss_and_one_summary(tmp_path, capsys):
    from byol3d.data.synthetic_ct import write_demo_dataset

    write_demo_dataset(tmp_path / "data", n=2, shape=(40, 40, 32), spacing=(8.0, 8.0, 10.0))
    code = main(
        [
            "pretrain", "configs/demo_ct.yaml", f"data.root={tmp_path / 'data' / 'images'}",
            f"output_dir={tmp_path / 'run'}", "data.val_fraction=0", "data.cache=none",
            "data.num_workers=0", "train.max_epochs=1", "train.batch_size=2",
            "train.progress=false", "train.tensorboard=false", "model.hidden_dim=16",
            "model.projection_dim=8", "transforms.roi_size=[32,32,32]", "transforms.pixdim=null",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    epoch_lines = [line for line in err.splitlines() if line.startswith("byol3d: epoch 1:")]
    assert len(epoch_lines) == 1 and "val" not in epoch_lines[0]
    assert out.count("byol3d: run ") == 1 and "byol3d: run " not in err  # one summary, once
    assert "loss:        train " in out and ", validation" not in out and "nan" not in out
    assert f"encoder:     {tmp_path / 'run' / 'encoder.pt'}" in out
