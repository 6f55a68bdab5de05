from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from byol3d.cli import main
from byol3d.data.discovery import read_image_list
from byol3d.data.synthetic_ct import write_demo_dataset
from byol3d.errors import DataError
from byol3d.evaluation.probe import knn_accuracy, linear_probe_accuracy, loo_knn_accuracy
from byol3d.training.pretrain import pretrain
from tests.evaluation.test_export import write_run
from tests.training.test_pretrain import tiny_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_demo_dataset(root, n=6, shape=(40, 40, 32), spacing=(8.0, 8.0, 10.0), seed=0)
    return root


def clusters(n_per_class=10, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(3, dim) * 10
    x = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centres])
    return x, np.repeat([0, 1, 2], n_per_class)


def test_probe_and_knn_separate_clusters_and_not_noise():
    x, y = clusters()
    assert linear_probe_accuracy(x, y, folds=5, seed=0) == 1.0
    assert knn_accuracy(x, y, k=5, folds=5, seed=0) == 1.0
    noise = np.random.default_rng(1).normal(size=x.shape)
    assert linear_probe_accuracy(noise, y, seed=0) < 0.7
    assert knn_accuracy(noise, y, seed=0) < 0.7


def test_loo_knn_matches_a_hand_count():
    f = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.3, 0.7], [0.6, 0.4]])
    # k=1 nearest by cosine: 0->1, 1->0, 2->3, 3->2, 4->1 (0.94 vs 0.84, 0.83); labels
    # 0,0,1,1,1: only 4 (label 1, neighbour label 0) is wrong
    assert loo_knn_accuracy(f, [0, 0, 1, 1, 1], k=1) == pytest.approx(4 / 5)


def test_labelled_list_resolves_paths_and_ids(phantoms, tmp_path):
    rows = read_image_list(phantoms / "classes.csv", require_label=True)
    assert rows[1] == {
        "image": str(phantoms / "images" / "ct_001.nii.gz"),
        "id": "ct_001",
        "label": "1",
    }
    (tmp_path / "ids.csv").write_text("id,label\nct_000,a\nct_001,b\n")
    rows = read_image_list(tmp_path / "ids.csv", root=phantoms, require_label=True)
    assert rows[0]["image"].endswith("ct_000.nii.gz") and rows[1]["label"] == "b"
    (tmp_path / "bad.csv").write_text("path,label\nimages/nope.nii.gz,0\n")
    with pytest.raises(DataError, match="line 2.*nope.nii.gz.*does not exist"):
        read_image_list(tmp_path / "bad.csv", root=phantoms, require_label=True)
    (tmp_path / "nolabel.csv").write_text("path\nimages/ct_000.nii.gz\n")
    with pytest.raises(DataError, match="needs a 'label' column"):
        read_image_list(tmp_path / "nolabel.csv", root=phantoms, require_label=True)


def test_evaluate_compares_with_random_encoders_of_the_run_seed_policy(phantoms, tmp_path, capsys):
    # the "pretrained" weights are exactly the seed-0 initialisation: random encoder 0 must
    # then give the same features and the same accuracies on seed 0
    write_run(tmp_path / "run", "resnet10", seed=0)
    code = main(["evaluate", str(tmp_path / "run"), "--csv", str(phantoms / "classes.csv"),
                 "--seeds", "2", "--folds", "2", "--k", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "| pretrained |" in out and "| random |" in out
    report = json.loads((tmp_path / "run" / "evaluation" / "evaluation.json").read_text())
    assert (
        report["n_images"] == 6
        and report["chance"] == pytest.approx(1 / 3)
        and report["folds"] == 2
    )
    seed0 = {
        (r["encoder"], r["method"]): r["accuracy"] for r in report["records"] if r["seed"] == 0
    }
    assert seed0[("pretrained", "linear_probe")] == seed0[("random", "linear_probe")]
    assert seed0[("pretrained", "knn_k1")] == seed0[("random", "knn_k1")]
    rows = list(csv.DictReader(open(tmp_path / "run" / "evaluation" / "evaluation.csv")))
    assert len(rows) == 2 * 2 * 2  # encoders x methods x seeds
    assert np.load(tmp_path / "run" / "evaluation" / "features_pretrained.npy").shape == (6, 512)


def test_online_knn_monitor_logs_to_epochs_csv(phantoms, tmp_path):
    cfg = tiny_config(phantoms / "images", tmp_path / "run", "train.max_epochs=2",
                      f"train.knn_csv={phantoms / 'classes.csv'}", "train.knn_every=2")  # fmt: skip
    pretrain(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "epochs.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["knn_acc"] == "nan" and 0.0 <= float(rows[1]["knn_acc"]) <= 1.0
