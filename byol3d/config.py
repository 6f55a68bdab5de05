"""Run configuration: defaults, YAML files, dotted overrides, strict validation.

A config is a nested dict with the sections ``data``, ``model``, ``transforms`` and
``train`` plus the top-level keys ``output_dir`` and ``seed``. Every key is declared in
:data:`byol3d.options.OPTIONS` with its default, type and meaning; an unknown key or a value of the wrong
type is a :class:`~byol3d.errors.ConfigError` naming the key (a typo is never silently
ignored). YAML is read with ``yaml.safe_load``: nothing in a config is evaluated as code.
With ``model.encoder: nnunet`` the plans file fills the keys the config leaves unset
(:mod:`byol3d.plans_defaults`).

>>> from byol3d.config import load_config
>>> cfg = load_config(None, ["data.root=/data/ct", "train.max_epochs=5", "transforms.roi_size=[96,96,96]"])
>>> cfg["train"]["max_epochs"], cfg["transforms"]["roi_size"]
(5, [96, 96, 96])
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from byol3d.checks import check_number, check_pair, is_number, per_view
from byol3d.errors import ConfigError
from byol3d.models.encoders import RESNETS
from byol3d.models.nnunet import check_crop
from byol3d.options import OPTIONS, SECTIONS, Option
from byol3d.plans_defaults import apply_plans_defaults, read_config_plans

__all__ = [
    "OPTIONS",
    "Option",
    "SECTIONS",
    "default_config",
    "load_config",
    "validate_config",
    "flatten",
    "dump_config",
]


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


def _set(
    flat: dict[str, Any], key: str, value: Any, where: str, explicit: set[str] | None = None
) -> None:
    if explicit is not None:
        explicit.add(key)
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
    explicit: set[str] = set()
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
            _set(flat, key, value, repr(str(path)), explicit)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like KEY=VALUE, e.g. train.max_epochs=5"
            )
        _set(flat, key, _parse_value(raw), "the command line", explicit)
    _channels_set_in_channels(flat)
    if flat["model.encoder"] == "nnunet":
        apply_plans_defaults(flat, explicit)
    cfg = _nest(flat)
    validate_config(cfg)
    return cfg


def _channels_set_in_channels(flat: dict[str, Any]) -> None:
    """``data.in_channels`` follows from ``data.channels``: its default 1 becomes the list's
    length (any other value must equal it; :func:`validate_config` checks)."""
    channels = flat["data.channels"]
    if isinstance(channels, list) and channels and flat["data.in_channels"] == 1:
        flat["data.in_channels"] = len(channels)


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


def _checked(check: Callable[..., Any], key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a :mod:`byol3d.checks` check on a config value; its ValueError as a ConfigError."""
    try:
        return check(key, value, *args, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _numbers(key: str, value: Any, length: int | None = None) -> list[float]:
    if not isinstance(value, list) or not all(is_number(v) for v in value):
        raise _fail(key, value, "a list of numbers")
    if length is not None and len(value) != length:
        raise _fail(key, value, f"a list of {length} numbers")
    return [float(v) for v in value]


_AT_LEAST_0 = {"low": 0}
_AT_LEAST_1 = {"low": 1}

#: Single numbers: key -> :func:`byol3d.checks.check_number` bounds.
NUMBER_RULES: dict[str, dict[str, Any]] = {
    "seed": {"low": 0, "high": 2**32, "high_open": True},
    "data.val_fraction": {"low": 0, "high": 1, "high_open": True},
    "data.cache_rate": {"low": 0, "high": 1, "low_open": True},
    "train.base_tau": {"low": 0, "high": 1},
    "train.lr": {"low": 0, "low_open": True},
    "train.momentum": {"low": 0, "high": 1, "high_open": True},
    "transforms.hue": {"low": 0, "high": 0.5},
    **dict.fromkeys(
        (
            "transforms.intensity_scale",
            "transforms.intensity_shift",
            "transforms.noise_std",
            "transforms.brightness",
            "transforms.contrast",
            "transforms.saturation",
            "train.weight_decay",
            "train.warmup_epochs",
            "data.num_workers",
            "train.tensorboard_views_every",
            "model.dense_weight",
        ),
        _AT_LEAST_0,
    ),
    **dict.fromkeys(
        (
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
            "model.swin_feature_size",
            "model.segresnet_init_filters",
            "train.knn_every",
        ),
        _AT_LEAST_1,
    ),
}

#: ``(min, max)`` pairs: key -> :func:`byol3d.checks.check_pair` ``(low, high, strict)``.
PAIR_RULES: dict[str, tuple[float, float, bool]] = {
    "transforms.scale": (0.0, 1.0, True),
    "transforms.ratio": (0.0, math.inf, True),
    "transforms.gamma": (0.0, math.inf, True),
    "transforms.blur_sigma": (0.0, math.inf, False),
}


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check choices and ranges of a nested config; raise ConfigError naming the first bad key.

    The one place config values are validated: the generic rules (no NaN/Inf, choices,
    per-view probabilities, :data:`NUMBER_RULES`, :data:`PAIR_RULES`) run the checks of
    :mod:`byol3d.checks` that the builders taking these values run too; the rest are rules
    between keys (``roi_size`` against ``spatial_dims``, ``min_lr`` against ``lr``, ...).
    """
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
            _checked(per_view, key, value)
        if key in NUMBER_RULES:
            _checked(check_number, key, value, **NUMBER_RULES[key])
        if key in PAIR_RULES:
            _checked(check_pair, key, value, *PAIR_RULES[key])
    _validate_geometry(flat)
    _validate_encoder(flat)
    _validate_2d(flat)
    _validate_train(flat)


def _validate_geometry(flat: Mapping[str, Any]) -> None:
    """``roi_size``, ``pixdim`` and ``hu_window``: their lengths follow ``data.spatial_dims``."""
    dims = flat["data.spatial_dims"]
    roi = flat["transforms.roi_size"]
    if len(roi) != dims or not all(isinstance(r, int) and not isinstance(r, bool) for r in roi):
        raise _fail(
            "transforms.roi_size", roi, f"a list of {dims} integers (data.spatial_dims is {dims})"
        )
    if flat["model.encoder"] == "nnunet":
        pass  # the plans' strides decide (_validate_encoder)
    elif min(roi) < 32:
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
    _validate_channels(flat)
    lo, hi = _numbers("transforms.percentiles", flat["transforms.percentiles"], 2)
    if not 0 <= lo < hi <= 100:
        raise _fail("transforms.percentiles", flat["transforms.percentiles"], "[low, high] with 0 <= low < high <= 100")  # fmt: skip


def _validate_channels(flat: Mapping[str, Any]) -> None:
    """``data.channels``: distinct names, as many as ``data.in_channels``, 3D only; patterns."""
    channels, patterns = flat["data.channels"], flat["data.channel_patterns"]
    if channels is None:
        if patterns is not None:
            raise _fail("data.channel_patterns", patterns, "null without data.channels")
        return
    if not channels or not all(isinstance(c, str) and c for c in channels) or len(set(channels)) != len(channels):  # fmt: skip
        raise _fail("data.channels", channels, "a list of distinct channel names, or null")
    if flat["data.spatial_dims"] != 3:
        raise _fail("data.channels", channels, "null with data.spatial_dims 2 (frames carry their colours)")  # fmt: skip
    if flat["data.in_channels"] != len(channels):
        raise _fail("data.in_channels", flat["data.in_channels"], f"{len(channels)}, the length of data.channels (or left at 1)")  # fmt: skip
    if patterns is not None and (len(patterns) != len(channels) or not all(isinstance(p, str) and p for p in patterns)):  # fmt: skip
        raise _fail("data.channel_patterns", patterns, f"{len(channels)} file-name patterns, one per channel of data.channels")  # fmt: skip


def _validate_encoder(flat: Mapping[str, Any]) -> None:
    """The settings of the non-ResNet encoders, and what they exclude."""
    name, roi = flat["model.encoder"], flat["transforms.roi_size"]
    for key, length in (("model.swin_depths", 4), ("model.segresnet_blocks_down", None)):
        value = flat[key]
        ints = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
        )
        if not ints or (length and len(value) != length) or len(value) < 2:
            n = f"{length} " if length else "2 or more "
            raise _fail(key, value, f"a list of {n}positive integers")
    if flat["model.swin_feature_size"] % 12:
        raise _fail("model.swin_feature_size", flat["model.swin_feature_size"], "a multiple of 12")
    if flat["model.segresnet_init_filters"] % 8:
        raise _fail(
            "model.segresnet_init_filters", flat["model.segresnet_init_filters"], "a multiple of 8"
        )
    dense = flat["model.dense_layer"]
    if dense == "avgpool" or (
        name in RESNETS and dense not in ("layer1", "layer2", "layer3", "layer4")
    ):
        raise _fail(
            "model.dense_layer",
            dense,
            "a stage of the encoder: layer1, layer2, layer3, layer4 (or, for non-ResNets, a stage's module name)",
        )
    if name in RESNETS:
        return
    if flat["model.norm"] != "batch":
        raise _fail(
            "model.norm",
            flat["model.norm"],
            f"batch (the default) with model.encoder {name}, which keeps its own normalisation",
        )
    for key in ("train.compile", "train.activation_checkpointing"):
        if flat[key]:
            raise _fail(key, flat[key], f"false with model.encoder {name} (ResNet encoders only)")
    if name == "swin_unetr" and any(r % 32 for r in roi):
        raise _fail(
            "transforms.roi_size",
            roi,
            "multiples of 32 with model.encoder swin_unetr (SwinUNETR's rule)",
        )
    if name == "nnunet":
        if flat["data.spatial_dims"] != 3:
            raise _fail(
                "data.spatial_dims", flat["data.spatial_dims"], "3 with model.encoder nnunet"
            )
        problem = check_crop(read_config_plans(flat), roi)
        if problem:
            raise _fail("transforms.roi_size", roi, problem)


def _validate_2d(flat: Mapping[str, Any]) -> None:
    """The keys of the 2D frame path (checked for 3D runs too: a config stays valid either way)."""
    if flat["data.min_frame_std"] is not None:
        _checked(check_number, "data.min_frame_std", flat["data.min_frame_std"], 0, 1)
    size = flat["transforms.frame_size"]
    if size is not None:
        _checked(check_number, "transforms.frame_size", size, 1)
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


def _validate_train(flat: Mapping[str, Any]) -> None:
    """Rules between training keys, optional values, and the device name."""
    if not 0 <= flat["train.min_lr"] <= flat["train.lr"]:
        raise _fail("train.min_lr", flat["train.min_lr"], f"in [0, train.lr = {flat['train.lr']}]")
    if not flat["output_dir"].strip():
        raise _fail("output_dir", flat["output_dir"], "a folder name")
    if flat["train.grad_clip"] is not None and flat["train.grad_clip"] <= 0:
        raise _fail("train.grad_clip", flat["train.grad_clip"], "> 0 or null")
    device = flat["train.device"]
    if not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise _fail("train.device", device, "auto, cpu, cuda or cuda:N")


def dump_config(cfg: Mapping[str, Any]) -> str:
    """The config as YAML, sections in a fixed order, keys in declaration order."""
    ordered: dict[str, Any] = {"output_dir": cfg["output_dir"], "seed": cfg["seed"]}
    for section in SECTIONS:
        keys = [k.split(".", 1)[1] for k in OPTIONS if k.startswith(section + ".")]
        ordered[section] = {k: cfg[section][k] for k in keys}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None)
