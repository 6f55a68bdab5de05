"""Run configuration: defaults, YAML files, dotted overrides, strict validation.

A config is a nested dict with the sections ``data``, ``model``, ``transforms`` and
``train`` plus the top-level keys ``output_dir`` and ``seed``. Every key is declared in
:data:`OPTIONS` with its default, type and meaning; an unknown key or a value of the wrong
type is a :class:`~byol3d.errors.ConfigError` naming the key (a typo is never silently
ignored). YAML is read with ``yaml.safe_load``: nothing in a config is evaluated as code.

>>> from byol3d.config import load_config
>>> cfg = load_config(None, ["data.root=/data/ct", "train.max_epochs=5", "transforms.roi_size=[96,96,96]"])
>>> cfg["train"]["max_epochs"], cfg["transforms"]["roi_size"]
(5, [96, 96, 96])
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from byol3d.errors import ConfigError
from byol3d.models.encoders import ENCODERS, NORMS

__all__ = [
    "OPTIONS",
    "Option",
    "default_config",
    "load_config",
    "validate_config",
    "flatten",
    "dump_config",
]


@dataclass(frozen=True)
class Option:
    """One config key: its default, the accepted types, and a one-line meaning."""

    default: Any
    types: tuple[type, ...]
    help: str
    choices: tuple[Any, ...] | None = None


_num = (int, float)
_prob = (int, float, list)  # a probability for both views, or [view1, view2]

OPTIONS: dict[str, Option] = {
    "seed": Option(0, (int,), "random seed of weights, data order and augmentations"),
    "output_dir": Option(
        "runs/byol3d", (str,), "run directory: config.yaml, checkpoints/, metrics.csv, encoder.pt"
    ),
    # data
    "data.root": Option(
        None,
        (str, type(None)),
        "folder searched recursively: 3D .nii/.nii.gz/.nrrd/.mha/.mhd and DICOM series; 2D .png/.jpg/.jpeg/.bmp/.tif/.tiff",
    ),
    "data.csv": Option(
        None,
        (str, type(None)),
        "2D and 3D: CSV list of images instead of a folder search (column path or id, optional label; relative to data.root)",
    ),
    "data.spatial_dims": Option(3, (int,), "3 for volumes, 2 for frames", (2, 3)),
    "data.in_channels": Option(
        1, (int,), "image channels: 1 for CT, 3 for RGB frames (2D: 1 or 3)"
    ),
    "data.dicom": Option(True, (bool,), "3D: also look for DICOM series folders under data.root"),
    "data.val_fraction": Option(
        0.1, _num, "fraction of files held out for the validation loss (0 for none)"
    ),
    "data.cache": Option(
        "cache",
        (str,),
        "none: load every epoch; cache: preprocessed volumes in RAM; persistent: on disk",
        ("none", "cache", "persistent"),
    ),
    "data.cache_dir": Option(
        None, (str, type(None)), "persistent cache folder (default OUTPUT_DIR/cache)"
    ),
    "data.cache_rate": Option(1.0, _num, "fraction of volumes kept in the RAM cache"),
    "data.on_bad_file": Option(
        "error",
        (str,),
        "an unusable image: error stops with its name; skip checks every file first, lists bad ones in OUTPUT_DIR/skipped_files.txt and goes on",
        ("error", "skip"),
    ),
    "data.num_workers": Option(2, (int,), "DataLoader worker processes"),
    "data.gpu_views": Option(
        False,
        (bool,),
        "draw the random views on the GPU in ThreadDataLoader threads (one CUDA device; pairs with cache: cache)",
    ),
    # model
    "model.encoder": Option("resnet50", (str,), "MONAI ResNet depth", ENCODERS),
    "model.norm": Option(
        "batch", (str,), "encoder normalisation; only batch loads strictly into FlexibleUNet", NORMS
    ),
    "model.hidden_layer": Option(
        "avgpool",
        (str,),
        "encoder layer whose output is the representation (spatial layers are averaged)",
    ),
    "model.projection_dim": Option(256, (int,), "projector/predictor output size (paper: 256)"),
    "model.hidden_dim": Option(4096, (int,), "projector/predictor hidden size (paper: 4096)"),
    "model.dense_weight": Option(
        0.0, _num, "weight of the dense (local) BYOL term on the views' overlap; 0 = off"
    ),
    "model.dense_layer": Option(
        "layer3",
        (str,),
        "encoder layer the dense term compares (layer2 for crops under ~96 voxels)",
        ("layer1", "layer2", "layer3", "layer4"),
    ),
    "model.dense_grid": Option(4, (int,), "dense term: points per axis sampled in each overlap"),
    # transforms
    "transforms.roi_size": Option(
        [128, 128, 128], (list,), "crop size of each view, one entry per spatial dim, each >= 32"
    ),
    "transforms.pixdim": Option(
        None, (list, type(None)), "3D: resample to this voxel spacing in mm (null: keep the file's)"
    ),
    "transforms.hu_window": Option(
        [-1000.0, 1000.0], (list,), "3D: HU range mapped to [0, 1], values outside clipped"
    ),
    "transforms.crop_foreground": Option(
        True, (bool,), "3D: crop to the bounding box of voxels above foreground_hu"
    ),
    "transforms.foreground_hu": Option(
        -500.0, _num, "3D: HU threshold of the body for the foreground crop"
    ),
    "transforms.scale": Option(
        [0.2, 1.0],
        (list,),
        "random resized crop: range of the crop's volume (2D: area) fraction (BYOL 2D: [0.08, 1.0])",
    ),
    "transforms.ratio": Option(
        [0.75, 1.3333333], (list,), "random resized crop: range of per-axis aspect ratios"
    ),
    "transforms.flip_prob": Option(
        0.5, _prob, "flip probability per axis (2D: horizontal flip only)"
    ),
    "transforms.rotate90_prob": Option(
        0.5, _prob, "3D: probability of a random 90-degree rotation in the axial plane"
    ),
    "transforms.intensity_prob": Option(
        0.8, _prob, "3D: probability of the intensity scale and shift"
    ),
    "transforms.intensity_scale": Option(0.1, _num, "3D: intensity scale factor range +-"),
    "transforms.intensity_shift": Option(
        0.1, _num, "3D: intensity shift range +- (in [0, 1] window units)"
    ),
    "transforms.gamma_prob": Option(0.5, _prob, "3D: probability of a gamma contrast change"),
    "transforms.gamma": Option([0.7, 1.5], (list,), "3D: gamma range"),
    "transforms.noise_prob": Option(0.2, _prob, "3D: probability of Gaussian noise"),
    "transforms.noise_std": Option(0.03, _num, "3D: Gaussian noise std (window units)"),
    "transforms.blur_prob": Option(
        [1.0, 0.1], _prob, "Gaussian smoothing probability per view (BYOL: 1.0 and 0.1)"
    ),
    "transforms.blur_sigma": Option(
        [0.5, 1.5], (list,), "Gaussian smoothing sigma range in voxels (BYOL 2D: [0.1, 2.0])"
    ),
    "transforms.frame_size": Option(
        None,
        (int, type(None)),
        "2D: shrink frames whose shorter side is longer than this before caching (null: keep)",
    ),
    "transforms.colour_jitter_prob": Option(
        0.8, _prob, "2D: probability of colour jitter (brightness, contrast, saturation, hue)"
    ),
    "transforms.brightness": Option(0.4, _num, "2D: brightness factor range 1 +-"),
    "transforms.contrast": Option(0.4, _num, "2D: contrast factor range 1 +-"),
    "transforms.saturation": Option(0.2, _num, "2D: saturation factor range 1 +-"),
    "transforms.hue": Option(
        0.1, _num, "2D: hue shift range +- (fraction of the colour circle, <= 0.5)"
    ),
    "transforms.grayscale_prob": Option(0.2, _prob, "2D: probability of converting to grey"),
    "transforms.solarize_prob": Option(
        [0.0, 0.2], _prob, "2D: probability of solarising at 0.5 per view (BYOL: 0.0 and 0.2)"
    ),
    "transforms.mean": Option(
        None,
        (list, type(None)),
        "2D: per-channel mean of the [0, 1] frames for normalisation (null: 0.5); byol3d stats measures it",
    ),
    "transforms.std": Option(
        None,
        (list, type(None)),
        "2D: per-channel std of the [0, 1] frames for normalisation (null: 0.5); byol3d stats measures it",
    ),
    # train
    "train.max_epochs": Option(
        100, (int,), "epochs; raising it and re-running resumes the same run"
    ),
    "train.batch_size": Option(4, (int,), "volumes per step per process (each gives two views)"),
    "train.optimizer": Option(
        "adamw",
        (str,),
        "adamw, sgd or lars (biases and norm weights get no decay/adaptation)",
        ("adamw", "sgd", "lars"),
    ),
    "train.lr": Option(
        3.0e-4, _num, "peak learning rate after warm-up (AdamW ~3e-4; LARS 0.2 x batch/256)"
    ),
    "train.min_lr": Option(0.0, _num, "learning rate at the end of the cosine decay"),
    "train.weight_decay": Option(1.0e-4, _num, "weight decay (paper with LARS: 1.5e-6)"),
    "train.momentum": Option(0.9, _num, "SGD/LARS momentum"),
    "train.warmup_epochs": Option(10.0, _num, "linear learning-rate warm-up length in epochs"),
    "train.base_tau": Option(
        0.996, _num, "initial target decay rate, cosine to 1.0 (0.99 for short runs)"
    ),
    "train.accumulate_steps": Option(
        1, (int,), "gradient accumulation: iterations per optimizer step"
    ),
    "train.amp": Option(
        "auto",
        (str,),
        "autocast: auto (bf16 on GPUs that support it, else fp16; off on CPU), bf16, fp16, none",
        ("auto", "bf16", "fp16", "none"),
    ),
    "train.channels_last": Option(
        "auto",
        (str,),
        "channels-last (3D) memory format for weights and batches: auto (on for CUDA only; slower on CPU), on, off",
        ("auto", "on", "off"),
    ),
    "train.compile": Option(
        False, (bool,), "torch.compile each residual block (first steps slower while compiling)"
    ),
    "train.activation_checkpointing": Option(
        False,
        (bool,),
        "recompute the encoder's activations in the backward pass: less memory for large crops, ~1/3 more compute",
    ),
    "train.device": Option("auto", (str,), "auto (cuda if available), cpu, cuda, cuda:N"),
    "train.sync_bn": Option(
        True, (bool,), "under DDP: batch-norm statistics over the global batch (SyncBatchNorm)"
    ),
    "train.grad_clip": Option(
        None, (int, float, type(None)), "clip the gradient norm to this value (null: off)"
    ),
    "train.log_every": Option(
        10, (int,), "iterations between metric flushes (the only host syncs)"
    ),
    "train.checkpoint_every": Option(1, (int,), "epochs between checkpoints"),
    "train.keep_checkpoints": Option(
        3,
        (int,),
        "newest checkpoints kept in checkpoints/ (older ones removed once a newer one is written)",
    ),
    "train.tensorboard_views_every": Option(
        500, (int,), "iterations between view previews in TensorBoard (0: never)"
    ),
    "train.progress": Option(True, (bool,), "show a tqdm progress bar"),
    "train.knn_csv": Option(
        None,
        (str, type(None)),
        "labels CSV (path or id, label) for an online kNN accuracy in epochs.csv (null: off)",
    ),
    "train.knn_every": Option(1, (int,), "epochs between online kNN evaluations"),
    "train.tensorboard": Option(
        True, (bool,), "write TensorBoard scalars when tensorboard is installed"
    ),
}

SECTIONS = ("data", "model", "transforms", "train")


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (sections only; list values stay lists)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name in SECTIONS:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def default_config() -> dict[str, Any]:
    """The nested default config (a fresh copy)."""
    return _nest({key: copy.deepcopy(opt.default) for key, opt in OPTIONS.items()})


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, OPTIONS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _set(flat: dict[str, Any], key: str, value: Any, where: str) -> None:
    if key not in OPTIONS:
        raise _unknown(key, where)
    opt = OPTIONS[key]
    if isinstance(value, bool) and bool not in opt.types:
        raise ConfigError(
            f"config key {key!r} in {where}: expected {_type_names(opt)}, got {value!r}"
        )
    if not isinstance(value, opt.types):
        raise ConfigError(
            f"config key {key!r} in {where}: expected {_type_names(opt)}, got {value!r}"
        )
    flat[key] = value


def _type_names(opt: Option) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(dict.fromkeys(names[t] for t in opt.types))


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults, then the YAML file at ``path``, then ``KEY=VALUE`` overrides, validated.

    Override values are parsed as YAML, so ``transforms.roi_size=[96,96,96]`` gives a list and
    ``train.lr=1e-3`` a number (YAML 1.1 needs ``1.0e-3``; both are accepted here).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, or out-of-range value.
    """
    flat = flatten(default_config())
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(
                f"cannot read config file {str(path)!r}: {err.strerror or err}"
            ) from err
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(
                f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}"
            ) from err
        if not isinstance(loaded, Mapping):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        for section in SECTIONS:
            if section in loaded and not isinstance(loaded[section], Mapping):
                raise ConfigError(
                    f"config key {section!r} in {str(path)!r} must be a mapping of keys"
                )
        for key, value in flatten(loaded).items():
            _set(flat, key, value, repr(str(path)))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like KEY=VALUE, e.g. train.max_epochs=5"
            )
        _set(flat, key, _parse_value(raw), "the command line")
    cfg = _nest(flat)
    validate_config(cfg)
    return cfg


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _fail(key: str, value: Any, must: str) -> ConfigError:
    return ConfigError(f"invalid {key} {value!r}: must be {must}")


def _numbers(key: str, value: Any, length: int | None = None) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(v, _num) and not isinstance(v, bool) for v in value
    ):
        raise _fail(key, value, "a list of numbers")
    if length is not None and len(value) != length:
        raise _fail(key, value, f"a list of {length} numbers")
    return [float(v) for v in value]


def _range(key: str, value: Any, low: float, high: float) -> None:
    lo, hi = _numbers(key, value, 2)
    if not (low <= lo <= hi <= high):
        raise _fail(key, value, f"[low, high] with {low} <= low <= high <= {high}")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check choices and ranges of a nested config; raise ConfigError naming the first bad key."""
    flat = flatten(cfg)
    for key, value in flat.items():
        if key not in OPTIONS:
            raise _unknown(key, "the config")
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise _fail(key, value, "finite (no NaN or Inf)")
        opt = OPTIONS[key]
        if opt.choices is not None and value not in opt.choices:
            raise _fail(key, value, "one of " + ", ".join(map(str, opt.choices)))
        if key.endswith("_prob"):
            probs = value if isinstance(value, list) else [value]
            if len(probs) not in (1, 2) or not all(
                isinstance(p, _num) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs
            ):
                raise _fail(key, value, "a probability in [0, 1] or a pair [view1, view2] of them")
    dims = flat["data.spatial_dims"]
    roi = flat["transforms.roi_size"]
    if len(roi) != dims or not all(isinstance(r, int) and not isinstance(r, bool) for r in roi):
        raise _fail(
            "transforms.roi_size", roi, f"a list of {dims} integers (data.spatial_dims is {dims})"
        )
    if min(roi) < 32:
        raise _fail(
            "transforms.roi_size", roi, "at least 32 on every axis: the encoder downsamples by 32"
        )
    if flat["model.norm"] == "instance" and min(roi) < 64:
        raise _fail(
            "transforms.roi_size",
            roi,
            "at least 64 on every axis with model.norm instance (layer4 needs > 1 voxel)",
        )
    if flat["transforms.pixdim"] is not None:
        pix = _numbers("transforms.pixdim", flat["transforms.pixdim"], dims)
        if min(pix) <= 0:
            raise _fail("transforms.pixdim", flat["transforms.pixdim"], "positive spacings in mm")
    lo, hi = _numbers("transforms.hu_window", flat["transforms.hu_window"], 2)
    if not lo < hi:
        raise _fail(
            "transforms.hu_window", flat["transforms.hu_window"], "[low, high] with low < high"
        )
    _range("transforms.scale", flat["transforms.scale"], 1e-6, 1.0)
    _range("transforms.ratio", flat["transforms.ratio"], 1e-6, float("inf"))
    _range("transforms.gamma", flat["transforms.gamma"], 1e-6, float("inf"))
    _range("transforms.blur_sigma", flat["transforms.blur_sigma"], 0.0, float("inf"))
    for key in ("transforms.intensity_scale", "transforms.intensity_shift", "transforms.noise_std"):
        if flat[key] < 0:
            raise _fail(key, flat[key], ">= 0")
    _validate_2d(flat)
    if not 0.0 <= flat["train.base_tau"] <= 1.0:
        raise _fail("train.base_tau", flat["train.base_tau"], "in [0, 1]")
    if not 0.0 <= flat["data.val_fraction"] < 1.0:
        raise _fail("data.val_fraction", flat["data.val_fraction"], "in [0, 1)")
    if not 0.0 < flat["data.cache_rate"] <= 1.0:
        raise _fail("data.cache_rate", flat["data.cache_rate"], "in (0, 1]")
    if flat["train.lr"] <= 0:
        raise _fail("train.lr", flat["train.lr"], "> 0")
    if not 0 <= flat["train.min_lr"] <= flat["train.lr"]:
        raise _fail("train.min_lr", flat["train.min_lr"], f"in [0, train.lr = {flat['train.lr']}]")
    if not 0 <= flat["seed"] < 2**32:
        raise _fail("seed", flat["seed"], "in [0, 2**32)")
    if not 0 <= flat["train.momentum"] < 1:
        raise _fail("train.momentum", flat["train.momentum"], "in [0, 1)")
    if not flat["output_dir"].strip():
        raise _fail("output_dir", flat["output_dir"], "a folder name")
    for key in (
        "train.weight_decay",
        "train.warmup_epochs",
        "data.num_workers",
        "train.tensorboard_views_every",
        "model.dense_weight",
    ):
        if flat[key] < 0:
            raise _fail(key, flat[key], ">= 0")
    for key in (
        "train.max_epochs",
        "train.batch_size",
        "train.accumulate_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "data.in_channels",
        "model.projection_dim",
        "model.hidden_dim",
        "model.dense_grid",
        "train.knn_every",
    ):
        if flat[key] < 1:
            raise _fail(key, flat[key], ">= 1")
    if flat["train.grad_clip"] is not None and flat["train.grad_clip"] <= 0:
        raise _fail("train.grad_clip", flat["train.grad_clip"], "> 0 or null")
    device = flat["train.device"]
    if not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise _fail("train.device", device, "auto, cpu, cuda or cuda:N")


def _validate_2d(flat: Mapping[str, Any]) -> None:
    """The keys of the 2D frame path (checked for 3D runs too: a config stays valid either way)."""
    for key in ("transforms.brightness", "transforms.contrast", "transforms.saturation"):
        if flat[key] < 0:
            raise _fail(key, flat[key], ">= 0")
    if not 0 <= flat["transforms.hue"] <= 0.5:
        raise _fail("transforms.hue", flat["transforms.hue"], "in [0, 0.5]")
    size = flat["transforms.frame_size"]
    if size is not None and size < 1:
        raise _fail("transforms.frame_size", size, ">= 1 or null")
    for key in ("transforms.mean", "transforms.std"):
        if flat[key] is not None:
            values = _numbers(key, flat[key])
            if len(values) not in (1, flat["data.in_channels"]):
                raise _fail(
                    key, flat[key], f"1 or data.in_channels = {flat['data.in_channels']} numbers"
                )
            if key == "transforms.std" and min(values) <= 0:
                raise _fail(key, flat[key], "positive numbers")
    if flat["data.spatial_dims"] == 2 and flat["data.in_channels"] not in (1, 3):
        raise _fail("data.in_channels", flat["data.in_channels"], "1 or 3 with data.spatial_dims 2")


def dump_config(cfg: Mapping[str, Any]) -> str:
    """The config as YAML, sections in a fixed order, keys in declaration order."""
    ordered: dict[str, Any] = {"output_dir": cfg["output_dir"], "seed": cfg["seed"]}
    for section in SECTIONS:
        keys = [k.split(".", 1)[1] for k in OPTIONS if k.startswith(section + ".")]
        ordered[section] = {k: cfg[section][k] for k in keys}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None)
