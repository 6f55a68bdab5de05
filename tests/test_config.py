from __future__ import annotations

import pytest
import yaml

from byol3d.config import OPTIONS, default_config, dump_config, load_config
from byol3d.errors import ConfigError

REQUIRED_KEYS = [
    "data.root",
    "data.spatial_dims",
    "model.encoder",
    "model.hidden_layer",
    "train.max_epochs",
    "train.batch_size",
    "transforms.roi_size",
    "output_dir",
    "seed",
]


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(OPTIONS)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        None,
        [
            "transforms.roi_size=[96,96,96]",
            "train.max_epochs=5",
            "model.encoder=resnet18",
            "train.lr=1e-3",
            "data.root=/data/ct",
            "transforms.pixdim=null",
        ],
    )
    assert cfg["transforms"]["roi_size"] == [96, 96, 96]
    assert cfg["train"]["max_epochs"] == 5
    assert cfg["model"]["encoder"] == "resnet18"
    assert cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["data"]["root"] == "/data/ct"
    assert cfg["transforms"]["pixdim"] is None


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain:\n  max_epochs: 7\n  batch_size: 2\n")
    cfg = load_config(path, ["train.max_epochs=9"])
    assert (cfg["seed"], cfg["train"]["max_epochs"], cfg["train"]["batch_size"]) == (3, 9, 2)
    assert cfg["model"]["encoder"] == default_config()["model"]["encoder"]


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.max_epoch=5", "train.max_epoch"),
        ("modle.encoder=resnet18", "modle.encoder"),
        ("foo=1", "foo"),
    ],
)
def test_unknown_override_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_is_named_with_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_epoch: 5\n")
    with pytest.raises(ConfigError, match=r"'train\.max_epoch'.*did you mean 'train\.max_epochs'"):
        load_config(path)


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.max_epochs=five", "train.max_epochs"),
        ("train.max_epochs=0", "train.max_epochs"),
        ("train.base_tau=1.5", "train.base_tau"),
        ("train.lr=-0.1", "train.lr"),
        ("transforms.roi_size=[96,96]", "transforms.roi_size"),
        ("transforms.roi_size=[16,16,16]", "transforms.roi_size"),
        ("transforms.hu_window=[1000,-1000]", "transforms.hu_window"),
        ("transforms.blur_prob=[1.0,1.2]", "transforms.blur_prob"),
        ("model.encoder=resnet11", "model.encoder"),
        ("data.cache=ram", "data.cache"),
        ("train.amp=fp8", "train.amp"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("train.device=gpu", "train.device"),
        ("data.dicom=3", "data.dicom"),
        ("seed=-1", "seed"),
        ("train.momentum=1", "train.momentum"),
        ("train.lr=.nan", "train.lr"),
        ("train.warmup_epochs=.inf", "train.warmup_epochs"),
        ("transforms.hu_window=[-.inf,.inf]", "transforms.hu_window"),
        ("output_dir=''", "output_dir"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        load_config(None, [override])


def test_instance_norm_needs_larger_crops():
    with pytest.raises(ConfigError, match="instance"):
        load_config(None, ["model.norm=instance", "transforms.roi_size=[32,32,32]"])
    load_config(None, ["model.norm=instance", "transforms.roi_size=[64,64,64]"])


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.max_epochs"])
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    code = tmp_path / "code.yaml"
    code.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="code.yaml"):
        load_config(code)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["data.root=/x", "train.max_epochs=3"])
    path = tmp_path / "out.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert list(yaml.safe_load(dump_config(cfg))) == [
        "output_dir",
        "seed",
        "data",
        "model",
        "transforms",
        "train",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "ct_resnet50.yaml",
        "demo_ct.yaml",
        "ct_swin_unetr.yaml",
        "ct_segresnet.yaml",
        "ct_nnunet_resenc.yaml",
    ],
)
def test_shipped_configs_load(name, monkeypatch):
    from pathlib import Path

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # the nnU-Net config names its example plans from the repository root
    cfg = load_config(root / "configs" / name)
    assert cfg["data"]["spatial_dims"] == 3
    if name == "ct_nnunet_resenc.yaml":  # the example plans' patch size, spacing (x, y, z), CT clip
        assert cfg["transforms"]["roi_size"] == [64, 64, 64]
        assert cfg["transforms"]["pixdim"] == [1.5, 1.5, 2.0]
        assert cfg["transforms"]["hu_window"] == [-958.0, 1096.0]
        assert cfg["transforms"]["intensity"] == "ct_window"


def test_nnunet_zscore_plans_give_the_zscore_rule(tmp_path):
    import json
    from pathlib import Path

    plans = Path(__file__).parents[1] / "configs" / "nnunet_resenc_example_plans.json"
    data = json.loads(plans.read_text())
    data["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    (tmp_path / "mr.json").write_text(json.dumps(data))
    over = ["model.encoder=nnunet", f"model.nnunet_plans={tmp_path / 'mr.json'}"]
    cfg = load_config(None, over)
    assert cfg["transforms"]["intensity"] == "zscore"
    assert cfg["transforms"]["hu_window"] == [-1000.0, 1000.0]  # no CT percentiles taken
    assert (
        load_config(None, [*over, "transforms.intensity=percentile"])["transforms"]["intensity"]
        == "percentile"
    )


def test_readme_config_reference_is_current():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    table = subprocess.run(
        [sys.executable, str(root / "scripts" / "config_reference.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert table in (root / "README.md").read_text(), (
        "run: python scripts/config_reference.py --write"
    )
