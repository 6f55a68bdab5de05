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
